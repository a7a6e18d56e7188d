//! Where the math runs: the `Device` a run asks for (`cpu`, `cuda`, `cuda:N`), the probe that
//! says whether that device can be used on this machine, and (feature `cuda`) the CUDA C kernels
//! of issue 12 with their NVRTC compilation to a cubin.
//!
//! `backend` is the abstraction a training step is written against (the CPU backend, and with
//! feature `cuda` the CUDA backend of `cuda::backend`); `model` is that step, written once.
//!
//! Status: the CUDA kernels under `cuda/` mirror CPU ops and are compile-checked for `sm_90` in
//! CI (`kernels/tests/nvrtc_compile.rs`) and executed under a host emulation
//! (`kernels/tests/cuda_emulation.rs`); the device step on the CPU backend reproduces the CPU
//! model bit for bit (`kernels/tests/device_model.rs`). **None of the CUDA path has run on a
//! GPU yet**: `--device cuda` trains through it when a driver and device are found, and
//! `scripts/gpu-check.sh` is the check to run on one.

pub mod backend;
pub mod cuda;
#[cfg(feature = "cuda")]
mod driver;
pub mod kernel_cache;
pub mod model;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod profile;

use std::fmt;
use std::str::FromStr;

/// The device a run asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU ops of `kernels::ops` (the reference).
    #[default]
    Cpu,
    /// CUDA device N (driver ordinal).
    Cuda(usize),
}

/// Why a device cannot be named or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "unknown device {0:?}: expected `cpu`, `cuda` or `cuda:N` (N a device index, e.g. cuda:0)"
    )]
    Parse(String),
    #[error(
        "--device cuda needs CUDA support, but this binary was built without `--features cuda` \
         (rebuild with `cargo build --release --features cuda`)"
    )]
    NotBuilt,
    #[error("no CUDA driver was found (libcuda.so.1 could not be loaded): {0}")]
    NoDriver(String),
    #[error("CUDA device {index} does not exist: the driver reports {found} device(s)")]
    NoSuchDevice { index: usize, found: usize },
    #[error("CUDA driver error: {0}")]
    Driver(String),
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceInfo {
    Cpu {
        threads: usize,
    },
    Cuda {
        index: usize,
        name: String,
        /// Compute capability (major, minor): 9.0 for an H100/H200.
        capability: (i32, i32),
        multiprocessors: i32,
        memory_bytes: usize,
    },
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceInfo::Cpu { threads } => write!(f, "cpu ({threads} threads)"),
            DeviceInfo::Cuda {
                index,
                name,
                capability: (maj, min),
                multiprocessors,
                memory_bytes,
            } => write!(
                f,
                "cuda:{index} {name} (compute capability {maj}.{min}, {multiprocessors} SMs, {:.1} GiB)",
                *memory_bytes as f64 / (1u64 << 30) as f64
            ),
        }
    }
}

/// The names cudarc tries for a CUDA library on Linux (`libcuda.so`, `libcuda.so.13`, …), for
/// error messages (cudarc's own list also holds Windows-style names).
#[cfg(feature = "cuda")]
pub(crate) fn searched_names(lib: &str) -> String {
    let prefix = format!("lib{lib}.so");
    let mut names: Vec<String> = cudarc::get_lib_name_candidates(lib)
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.dedup();
    names.join(", ")
}

impl FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Device, DeviceError> {
        let bad = || DeviceError::Parse(s.to_string());
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                // digits only: `cuda:+1` and `cuda: 1` are refused, as `usize::from_str` alone would not
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                n.parse().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Device {
    /// Whether this device can be used here, and what it is: for CUDA, loads the driver (never
    /// panics when it is missing), checks the index and reads name, capability and memory.
    pub fn probe(self) -> Result<DeviceInfo, DeviceError> {
        match self {
            Device::Cpu => Ok(DeviceInfo::Cpu {
                threads: rayon::current_num_threads(),
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(index) => driver::probe(index),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(DeviceError::NotBuilt),
        }
    }

    /// Ok when a training run can use this device: the CPU always; a CUDA device when this
    /// binary has the feature and the probe finds the driver and the device (the error says
    /// which is missing).
    pub fn ensure_can_train(self) -> Result<DeviceInfo, DeviceError> {
        self.probe()
    }
}

/// ‖got − want‖ / ‖want‖ in f64: how far a device's result is from its reference, one figure
/// for a whole tensor: 0 when they are equal, infinite when the lengths differ or a value is not
/// finite. The backends' checks at open and the parity harnesses judge with it.
pub fn norm_rel_error(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&g, &c) in got.iter().zip(want) {
        if !g.is_finite() || !c.is_finite() {
            return f64::INFINITY;
        }
        let d = g as f64 - c as f64;
        diff += d * d;
        norm += c as f64 * c as f64;
    }
    if diff == 0.0 {
        0.0
    } else {
        (diff / norm).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_cuda_and_indices() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:0".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:7".parse(), Ok(Device::Cuda(7)));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        assert_eq!(Device::default(), Device::Cpu);
    }

    #[test]
    fn refuses_other_names_and_names_the_value() {
        for bad in [
            "gpu7", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cuda: 1", "", "cpu0",
        ] {
            let e = bad.parse::<Device>().unwrap_err();
            assert_eq!(e, DeviceError::Parse(bad.to_string()));
            let msg = e.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(msg.contains("`cpu`, `cuda` or `cuda:N`"), "{msg}");
        }
        let huge = "cuda:99999999999999999999999";
        assert!(matches!(huge.parse::<Device>(), Err(DeviceError::Parse(_))));
    }

    #[test]
    fn cpu_probes_and_trains() {
        assert!(matches!(Device::Cpu.probe(), Ok(DeviceInfo::Cpu { .. })));
        assert!(Device::Cpu.ensure_can_train().is_ok());
    }

    /// Without the feature, or (on this GPU-less CI machine) without a driver, `cuda` is refused
    /// with a message that says which; on a machine with a GPU the finding is printed and the
    /// refusal names the missing training path.
    #[test]
    fn cuda_is_refused_with_the_reason() {
        let e = match Device::Cuda(0).ensure_can_train() {
            Ok(info) => {
                println!(
                    "a CUDA driver and device are present: {info}; skipping the no-driver check"
                );
                return;
            }
            Err(e) => e,
        };
        let msg = e.to_string();
        println!("--device cuda: {msg}");
        let built = cfg!(feature = "cuda");
        match &e {
            DeviceError::NotBuilt => {
                assert!(!built, "{msg}");
                assert!(msg.contains("built without `--features cuda`"), "{msg}");
            }
            DeviceError::NoDriver(_) => {
                assert!(built, "{msg}");
                assert!(
                    msg.starts_with(
                        "no CUDA driver was found (libcuda.so.1 could not be loaded): "
                    ),
                    "{msg}"
                );
            }
            other => println!("CUDA present but unusable here ({other}); skipping"),
        }
    }
}
