//! Which data paths this build has and whether this machine can use them: TCP always; RDMA with
//! feature `rdma` and a device; GPU peer copies with feature `cuda`, a driver and two GPUs.
//! A worker logs this at start; whatever is missing, it says why and the job uses TCP.

/// Whether RDMA can be used here, in words.
fn rdma() -> String {
    #[cfg(feature = "rdma")]
    return match crate::rdma::RdmaEndpoint::open(1 << 20) {
        Ok(_) => "rdma: a device is present (the worker's data plane is TCP so far)".to_string(),
        Err(e) => format!("rdma: {e}"),
    };
    #[cfg(not(feature = "rdma"))]
    "rdma: not built (build with --features rdma)".to_string()
}

/// Whether GPU peer copies can be used here, in words.
fn cuda() -> String {
    #[cfg(feature = "cuda")]
    return match crate::nvlink::PeerCopy::open(0, 1) {
        Ok(_) => {
            "cuda: peer copies between GPU 0 and 1 work (the worker's data plane is TCP so far)"
                .to_string()
        }
        Err(e) => format!("cuda: {e}"),
    };
    #[cfg(not(feature = "cuda"))]
    "cuda: not built (build with --features cuda)".to_string()
}

/// One line per fast path, saying whether it can be used here and why not.
pub fn fast_paths() -> Vec<String> {
    vec![rdma(), cuda()]
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_path_says_where_it_stands() {
        let p = super::fast_paths();
        assert_eq!(p.len(), 2);
        assert!(
            p[0].starts_with("rdma: ") && p[1].starts_with("cuda: "),
            "{p:?}"
        );
    }
}
