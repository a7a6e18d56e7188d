//! RDMA (feature `rdma`, through rdma-sys / libibverbs): one reliable-connected queue pair per
//! peer, a registered buffer on each side, and frames moved by RDMA write with immediate (the
//! immediate carries the frame's length; the receiver learns of it from a completion, no CPU on
//! the data path). The queue pairs' addresses (`QpInfo`) are exchanged over the TCP link.
//!
//! **Not run on RDMA hardware.** The machines this was written on have no RDMA device (and no
//! soft-RoCE), so only the no-device path has run: `RdmaEndpoint::open` fails with
//! [`RdmaError::NoDevice`] and the job keeps its TCP link.

use rdma_sys::*;
use std::ptr;
use std::time::{Duration, Instant};

/// Why an RDMA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("no RDMA device (ibv_get_device_list found none): the job uses TCP")]
    NoDevice,
    #[error("{call} failed: {err}")]
    Verbs {
        call: &'static str,
        err: std::io::Error,
    },
    #[error("a frame of {len} bytes does not fit the registered buffer of {cap} bytes")]
    TooLarge { len: usize, cap: usize },
    #[error("no completion within {0:?}")]
    Timeout(Duration),
    #[error("work completion failed with status {0}")]
    Completion(u32),
    #[error("not connected: call connect with the peer's QpInfo first")]
    NotConnected,
    #[error("QpInfo of {0} bytes, expected {QP_INFO_BYTES}")]
    BadInfo(usize),
}

fn verbs(call: &'static str) -> RdmaError {
    RdmaError::Verbs {
        call,
        err: std::io::Error::last_os_error(),
    }
}

/// What a peer needs to reach this endpoint's queue pair and buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpInfo {
    pub qpn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    pub psn: u32,
    pub rkey: u32,
    pub addr: u64,
    pub len: u64,
}

/// Bytes of an encoded [`QpInfo`].
pub const QP_INFO_BYTES: usize = 4 + 2 + 16 + 4 + 4 + 8 + 8;

impl QpInfo {
    pub fn to_bytes(&self) -> [u8; QP_INFO_BYTES] {
        let mut b = [0u8; QP_INFO_BYTES];
        b[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..6].copy_from_slice(&self.lid.to_le_bytes());
        b[6..22].copy_from_slice(&self.gid);
        b[22..26].copy_from_slice(&self.psn.to_le_bytes());
        b[26..30].copy_from_slice(&self.rkey.to_le_bytes());
        b[30..38].copy_from_slice(&self.addr.to_le_bytes());
        b[38..46].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<QpInfo, RdmaError> {
        if b.len() != QP_INFO_BYTES {
            return Err(RdmaError::BadInfo(b.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(QpInfo {
            qpn: u32_at(0),
            lid: u16::from_le_bytes([b[4], b[5]]),
            gid: b[6..22].try_into().expect("16 bytes"),
            psn: u32_at(22),
            rkey: u32_at(26),
            addr: u64_at(30),
            len: u64_at(38),
        })
    }
}

/// RDMA devices on this machine (0 when libibverbs finds none).
pub fn device_count() -> usize {
    let mut n = 0;
    // SAFETY: ibv_get_device_list writes the count and returns a list we free at once
    unsafe {
        let list = ibv_get_device_list(&mut n);
        if !list.is_null() {
            ibv_free_device_list(list);
        }
    }
    n.max(0) as usize
}

/// One queue pair to one peer, with its registered buffer: the first half receives the peer's
/// writes, the second stages this side's outgoing frames.
pub struct RdmaEndpoint {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    mr: *mut ibv_mr,
    buf: Box<[u8]>,
    half: usize,
    port: u8,
    local: QpInfo,
    peer: Option<QpInfo>,
}

// SAFETY: the verbs objects are used from one thread at a time (`&mut self`); libibverbs
// objects may move between threads.
unsafe impl Send for RdmaEndpoint {}

const PORT: u8 = 1;
const CQ_DEPTH: i32 = 64;

impl RdmaEndpoint {
    /// Opens the first RDMA device, with frames of up to `max_frame` bytes.
    pub fn open(max_frame: usize) -> Result<RdmaEndpoint, RdmaError> {
        // SAFETY: plain libibverbs calls; every pointer is checked before use and released in
        // Drop (or here on failure, through the partially built endpoint's Drop)
        unsafe {
            let mut n = 0;
            let list = ibv_get_device_list(&mut n);
            if list.is_null() || n <= 0 {
                if !list.is_null() {
                    ibv_free_device_list(list);
                }
                return Err(RdmaError::NoDevice);
            }
            let ctx = ibv_open_device(*list);
            ibv_free_device_list(list);
            if ctx.is_null() {
                return Err(verbs("ibv_open_device"));
            }
            let mut ep = RdmaEndpoint {
                ctx,
                pd: ptr::null_mut(),
                cq: ptr::null_mut(),
                qp: ptr::null_mut(),
                mr: ptr::null_mut(),
                buf: vec![0u8; 2 * max_frame].into_boxed_slice(),
                half: max_frame,
                port: PORT,
                local: QpInfo {
                    qpn: 0,
                    lid: 0,
                    gid: [0; 16],
                    psn: 0,
                    rkey: 0,
                    addr: 0,
                    len: 0,
                },
                peer: None,
            };
            ep.pd = ibv_alloc_pd(ctx);
            if ep.pd.is_null() {
                return Err(verbs("ibv_alloc_pd"));
            }
            let access = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
                .0 as i32;
            ep.mr = ibv_reg_mr(ep.pd, ep.buf.as_mut_ptr().cast(), ep.buf.len(), access);
            if ep.mr.is_null() {
                return Err(verbs("ibv_reg_mr"));
            }
            ep.cq = ibv_create_cq(ctx, CQ_DEPTH, ptr::null_mut(), ptr::null_mut(), 0);
            if ep.cq.is_null() {
                return Err(verbs("ibv_create_cq"));
            }
            let mut init: ibv_qp_init_attr = std::mem::zeroed();
            init.send_cq = ep.cq;
            init.recv_cq = ep.cq;
            init.qp_type = ibv_qp_type::IBV_QPT_RC;
            init.cap.max_send_wr = 16;
            init.cap.max_recv_wr = 16;
            init.cap.max_send_sge = 1;
            init.cap.max_recv_sge = 1;
            ep.qp = ibv_create_qp(ep.pd, &mut init);
            if ep.qp.is_null() {
                return Err(verbs("ibv_create_qp"));
            }
            let mut port: ibv_port_attr = std::mem::zeroed();
            if ___ibv_query_port(ctx, ep.port, &mut port) != 0 {
                return Err(verbs("ibv_query_port"));
            }
            let mut gid: ibv_gid = std::mem::zeroed();
            // RoCE needs the GID; InfiniBand can go by LID alone
            let _ = ibv_query_gid(ctx, ep.port, 0, &mut gid);
            ep.local = QpInfo {
                qpn: (*ep.qp).qp_num,
                lid: port.lid,
                gid: gid.raw,
                psn: (std::process::id() ^ 0x5A5A) & 0xFF_FFFF,
                rkey: (*ep.mr).rkey,
                addr: ep.buf.as_ptr() as u64,
                len: ep.half as u64,
            };
            ep.modify_init()?;
            Ok(ep)
        }
    }

    /// This endpoint's address, for the peer.
    pub fn info(&self) -> QpInfo {
        self.local
    }

    unsafe fn modify(
        &mut self,
        attr: &mut ibv_qp_attr,
        mask: ibv_qp_attr_mask,
    ) -> Result<(), RdmaError> {
        // SAFETY: self.qp is a live queue pair; attr is fully initialised by the caller
        if unsafe { ibv_modify_qp(self.qp, attr, mask.0 as i32) } != 0 {
            return Err(verbs("ibv_modify_qp"));
        }
        Ok(())
    }

    fn modify_init(&mut self) -> Result<(), RdmaError> {
        // SAFETY: a zeroed ibv_qp_attr is a valid value; the mask names the fields set
        unsafe {
            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_INIT;
            a.pkey_index = 0;
            a.port_num = self.port;
            a.qp_access_flags = ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
            self.modify(
                &mut a,
                ibv_qp_attr_mask::IBV_QP_STATE
                    | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                    | ibv_qp_attr_mask::IBV_QP_PORT
                    | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS,
            )
        }
    }

    /// Connects to the peer (INIT → ready to receive → ready to send) and posts the first
    /// receive.
    pub fn connect(&mut self, peer: QpInfo) -> Result<(), RdmaError> {
        // SAFETY: as in modify_init
        unsafe {
            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_RTR;
            a.path_mtu = ibv_mtu::IBV_MTU_1024;
            a.dest_qp_num = peer.qpn;
            a.rq_psn = peer.psn;
            a.max_dest_rd_atomic = 1;
            a.min_rnr_timer = 12;
            a.ah_attr.dlid = peer.lid;
            a.ah_attr.port_num = self.port;
            if peer.gid != [0; 16] {
                a.ah_attr.is_global = 1;
                a.ah_attr.grh.dgid.raw = peer.gid;
                a.ah_attr.grh.hop_limit = 1;
            }
            self.modify(
                &mut a,
                ibv_qp_attr_mask::IBV_QP_STATE
                    | ibv_qp_attr_mask::IBV_QP_AV
                    | ibv_qp_attr_mask::IBV_QP_PATH_MTU
                    | ibv_qp_attr_mask::IBV_QP_DEST_QPN
                    | ibv_qp_attr_mask::IBV_QP_RQ_PSN
                    | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
                    | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER,
            )?;
            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_RTS;
            a.timeout = 14;
            a.retry_cnt = 7;
            a.rnr_retry = 7;
            a.sq_psn = self.local.psn;
            a.max_rd_atomic = 1;
            self.modify(
                &mut a,
                ibv_qp_attr_mask::IBV_QP_STATE
                    | ibv_qp_attr_mask::IBV_QP_TIMEOUT
                    | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
                    | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
                    | ibv_qp_attr_mask::IBV_QP_SQ_PSN
                    | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC,
            )?;
        }
        self.peer = Some(peer);
        self.post_recv()
    }

    /// A receive for the next write with immediate (its data lands in the buffer directly).
    fn post_recv(&mut self) -> Result<(), RdmaError> {
        // SAFETY: a receive with no scatter entries: the write's data goes where the writer
        // put it, only the immediate comes through the completion
        unsafe {
            let mut wr: ibv_recv_wr = std::mem::zeroed();
            wr.wr_id = 1;
            let mut bad: *mut ibv_recv_wr = ptr::null_mut();
            if ibv_post_recv(self.qp, &mut wr, &mut bad) != 0 {
                return Err(verbs("ibv_post_recv"));
            }
        }
        Ok(())
    }

    /// Writes `frame` into the peer's buffer with its length as the immediate, and waits for
    /// the send's completion.
    pub fn write_frame(&mut self, frame: &[u8], timeout: Duration) -> Result<(), RdmaError> {
        let peer = self.peer.ok_or(RdmaError::NotConnected)?;
        let cap = self.half.min(peer.len as usize);
        if frame.len() > cap {
            return Err(RdmaError::TooLarge {
                len: frame.len(),
                cap,
            });
        }
        let (_, staging) = self.buf.split_at_mut(self.half);
        staging[..frame.len()].copy_from_slice(frame);
        // SAFETY: the staging half is registered (lkey) and stays alive until the completion
        unsafe {
            let mut sge = ibv_sge {
                addr: staging.as_ptr() as u64,
                length: frame.len() as u32,
                lkey: (*self.mr).lkey,
            };
            let mut wr: ibv_send_wr = std::mem::zeroed();
            wr.wr_id = 2;
            wr.sg_list = &mut sge;
            wr.num_sge = 1;
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.imm_data_invalidated_rkey_union = imm_data_invalidated_rkey_union_t {
                imm_data: (frame.len() as u32).to_be(),
            };
            wr.wr = wr_t {
                rdma: rdma_t {
                    remote_addr: peer.addr,
                    rkey: peer.rkey,
                },
            };
            let mut bad: *mut ibv_send_wr = ptr::null_mut();
            if ibv_post_send(self.qp, &mut wr, &mut bad) != 0 {
                return Err(verbs("ibv_post_send"));
            }
        }
        self.wait(2, timeout).map(|_| ())
    }

    /// Waits for the peer's next frame; returns it (a view of the receive half).
    pub fn read_frame(&mut self, timeout: Duration) -> Result<&[u8], RdmaError> {
        let len = self.wait(1, timeout)? as usize;
        self.post_recv()?;
        Ok(&self.buf[..len.min(self.half)])
    }

    /// Polls the completion queue for work request `wr_id`; returns its immediate (host order).
    fn wait(&mut self, wr_id: u64, timeout: Duration) -> Result<u32, RdmaError> {
        let t = Instant::now();
        loop {
            // SAFETY: the CQ is live; wc is written by the poll
            let (n, wc) = unsafe {
                let mut wc: ibv_wc = std::mem::zeroed();
                (ibv_poll_cq(self.cq, 1, &mut wc), wc)
            };
            if n < 0 {
                return Err(verbs("ibv_poll_cq"));
            }
            if n == 1 {
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    return Err(RdmaError::Completion(wc.status));
                }
                if wc.wr_id == wr_id {
                    // SAFETY: the immediate is set for RDMA write with immediate completions
                    return Ok(u32::from_be(unsafe {
                        wc.imm_data_invalidated_rkey_union.imm_data
                    }));
                }
            } else if t.elapsed() > timeout {
                return Err(RdmaError::Timeout(timeout));
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

impl Drop for RdmaEndpoint {
    fn drop(&mut self) {
        // SAFETY: each object is destroyed once, children before parents
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.mr.is_null() {
                ibv_dereg_mr(self.mr);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            if !self.ctx.is_null() {
                ibv_close_device(self.ctx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qp_info_round_trips_and_short_input_is_refused() {
        let i = QpInfo {
            qpn: 0x1234,
            lid: 7,
            gid: [9; 16],
            psn: 0xABCDE,
            rkey: 42,
            addr: 0xDEAD_BEEF,
            len: 1 << 20,
        };
        assert_eq!(QpInfo::from_bytes(&i.to_bytes()).unwrap(), i);
        assert!(matches!(
            QpInfo::from_bytes(&[0; 10]),
            Err(RdmaError::BadInfo(10))
        ));
    }

    #[test]
    fn without_a_device_opening_is_a_clear_error() {
        if device_count() > 0 {
            eprintln!("skipped: this machine has an RDMA device");
            return;
        }
        let e = RdmaEndpoint::open(1 << 20).err().expect("no device here");
        assert!(matches!(e, RdmaError::NoDevice));
        assert!(e.to_string().contains("uses TCP"), "{e}");
    }
}
