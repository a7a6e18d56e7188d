//! The CUDA C kernels of `kernels::device::cuda`, **executed on the CPU** (issue 12): a host
//! emulation (`cuda_emulation/shim.h`: every CUDA thread of a block a `std::thread`, real
//! barriers for `__syncthreads`, per-warp barriers for the shuffles, blocks one after another)
//! compiled with g++ together with the `.cu` sources and a driver (`cuda_emulation/driver.cpp`)
//! that launches each kernel with the grid and block of its Rust launch wrapper. The outputs are
//! compared with the CPU ops the kernels mirror, with the verdicts of the GPU parity harness
//! (`gpu_parity.rs`): bit for bit where a kernel's header claims the CPU's bits, else 1e-5
//! relative (attention: normwise). This checks indexing, masking, synchronisation and numerics
//! without a GPU, not speed and not real GPU behaviour (memory model, warp scheduling); CUDA's
//! `expf`/`logf` are the host libm's here, and `cuda_fp8.h` is `cuda_emulation/include/cuda_fp8.h`,
//! a stand-in for its one E4M3 conversion written from the format (the real intrinsic's agreement
//! with `fp8::format` was measured on an H200), so the quantisers' groups, amax, scales and
//! indexing are checked, not the conversion instruction.
//!
//! Without a C++20 compiler (`g++` or `c++` with `<barrier>`) it prints `SKIPPED: <reason>` and
//! passes. Inputs are random each run; the seed is printed and `PHALANX_PARITY_SEED=N` repeats it.

#[path = "cuda_emulation/checks.rs"]
mod checks;
#[path = "cuda_emulation/fp8_checks.rs"]
mod fp8_checks;
#[path = "common/parity.rs"]
mod parity;
#[path = "cuda_emulation/step_checks.rs"]
mod step_checks;

use checks::failed;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// A value the driver reads or writes as raw little-endian bytes.
pub trait Raw: Copy {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

macro_rules! raw {
    ($($t:ty),*) => {$(
        impl Raw for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("element size"))
            }
        }
    )*};
}
raw!(f32, f64, u32, u16, u8, i64, i32);

/// The compiled driver and a scratch folder per run.
pub struct Emu {
    exe: PathBuf,
    root: PathBuf,
    runs: std::cell::Cell<usize>,
}

/// One driver run's folder: inputs written before, outputs read after.
pub struct Run {
    dir: PathBuf,
}

impl Run {
    pub fn put<T: Raw>(&self, name: &str, v: &[T]) {
        let mut b = Vec::with_capacity(v.len() * T::SIZE);
        v.iter().for_each(|x| x.put(&mut b));
        std::fs::write(self.dir.join(format!("{name}.bin")), b).expect("writing an input");
    }

    pub fn get<T: Raw>(&self, name: &str) -> Vec<T> {
        let b = std::fs::read(self.dir.join(format!("{name}.bin")))
            .unwrap_or_else(|e| panic!("reading the driver's {name}: {e}"));
        b.chunks_exact(T::SIZE).map(T::get).collect()
    }
}

/// A float argument of the driver: its IEEE bits, so it crosses exactly.
pub fn bits(x: f32) -> String {
    x.to_bits().to_string()
}

impl Emu {
    /// A fresh folder for one run.
    pub fn prepare(&self) -> Run {
        let n = self.runs.get();
        self.runs.set(n + 1);
        let dir = self.root.join(format!("run{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a run folder");
        Run { dir }
    }

    /// Runs the driver's `op` on `run`'s inputs; an error (non-zero exit) as its stderr.
    pub fn exec(&self, run: &Run, op: &str, args: &[String]) -> Result<(), String> {
        let out = Command::new(&self.exe)
            .arg(op)
            .arg(&run.dir)
            .args(args)
            .output()
            .map_err(|e| format!("running the driver: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "driver {op} {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

const FLAGS: [&str; 4] = ["-std=c++20", "-O2", "-pthread", "-ffp-contract=off"];

/// The first of g++ and c++ that compiles a C++20 `std::barrier`, or why none does.
fn compiler(dir: &Path) -> Result<String, String> {
    let probe = dir.join("probe.cpp");
    std::fs::write(
        &probe,
        "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n",
    )
    .map_err(|e| e.to_string())?;
    let mut why = Vec::new();
    for cxx in ["g++", "c++"] {
        match Command::new(cxx)
            .args(FLAGS)
            .arg(&probe)
            .arg("-o")
            .arg(dir.join("probe"))
            .output()
        {
            Err(e) => why.push(format!("{cxx}: {e}")),
            Ok(o) if !o.status.success() => why.push(format!("{cxx} lacks C++20 <barrier>")),
            Ok(_) => return Ok(cxx.to_string()),
        }
    }
    Err(why.join("; "))
}

#[test]
fn cuda_kernels_emulated_on_the_host_match_the_cpu_ops() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda_emulation");
    std::fs::create_dir_all(&root).expect("creating the scratch folder");
    let cxx = match compiler(&root) {
        Ok(c) => c,
        Err(why) => {
            println!("SKIPPED: no C++20 compiler with <barrier> ({why})");
            return;
        }
    };
    let t0 = Instant::now();
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emulation/driver.cpp");
    let exe = root.join("driver");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emulation/include");
    let out = Command::new(&cxx)
        .args(FLAGS)
        .arg("-I")
        .arg(&include)
        .arg(&driver)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running the C++ compiler");
    assert!(
        out.status.success(),
        "{cxx} failed on {}:\n{}",
        driver.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "driver compiled by {cxx} in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let seed = parity::seed();
    println!("seed {seed} (repeat with PHALANX_PARITY_SEED={seed})");
    let emu = Emu {
        exe,
        root,
        runs: std::cell::Cell::new(0),
    };
    let mut r = parity::Report::default();
    // PHALANX_EMU_ONLY=name,… runs only those families (while working on a kernel)
    let only = std::env::var("PHALANX_EMU_ONLY").ok();
    let wanted = |name: &str| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|n| n == name))
    };
    for (name, family) in checks::FAMILIES.into_iter().filter(|(n, _)| wanted(n)) {
        if only.is_some() {
            println!("PHALANX_EMU_ONLY: {name}");
        }
        let t = Instant::now();
        println!("== {name}");
        family(&emu, &mut r, seed);
        println!("   {name}: {:.1} s", t.elapsed().as_secs_f64());
    }
    r.print();
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(r.failures(), 0, "emulated kernels differ from the CPU ops");
}
