//! Every CUDA C kernel of `kernels::device::cuda` compiles with NVRTC to a cubin for `sm_90` (the
//! H200) and ptxas reports no register spills. Needs libnvrtc on the library path and the CUDA
//! headers in `PHALANX_CUDA_INCLUDE` (.ci/run installs both from PyPI wheels); without libnvrtc
//! the test prints why and passes. Compiling says nothing about running: no GPU is used here.

#![cfg(feature = "cuda")]

use kernels::device::cuda::SOURCES;
use kernels::device::nvrtc;

const ARCH: &str = "sm_90";

#[test]
fn every_kernel_compiles_for_sm90_without_spills() {
    if !nvrtc::library_present() {
        println!(
            "SKIPPED: libnvrtc could not be loaded (set LD_LIBRARY_PATH to a CUDA 13 lib directory; \
             .ci/run installs the nvidia-cuda-nvrtc wheel)"
        );
        return;
    }
    let (major, minor) = nvrtc::version().expect("nvrtcVersion");
    println!("NVRTC {major}.{minor}, options {:?}", nvrtc::options(ARCH));
    let mut failures = Vec::new();
    let mut kernels = 0;
    for src in SOURCES {
        let c = match nvrtc::compile(src, ARCH) {
            Ok(c) => c,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        assert!(
            c.cubin.starts_with(b"\x7fELF"),
            "{}: the cubin is not an ELF image",
            c.name
        );
        for e in src.entry_points {
            let Some(r) = c.kernels.iter().find(|r| r.function == *e) else {
                failures.push(format!(
                    "{}.cu: ptxas reported nothing for {e}; log:\n{}",
                    src.name, c.log
                ));
                continue;
            };
            kernels += 1;
            println!(
                "{:<12} {:<30} {:>3} registers, {:>4} B stack, spill stores {} B, spill loads {} B",
                src.name,
                r.function,
                r.registers,
                r.stack_bytes,
                r.spill_store_bytes,
                r.spill_load_bytes
            );
            if r.spill_store_bytes > 0 || r.spill_load_bytes > 0 {
                failures.push(format!(
                    "{}.cu: {e} spills ({} B stores, {} B loads)",
                    src.name, r.spill_store_bytes, r.spill_load_bytes
                ));
            }
        }
        println!("{}.cu: cubin {} bytes", src.name, c.cubin.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!(
        "{kernels} kernels in {} sources compiled for {ARCH}, no spills",
        SOURCES.len()
    );
}

#[test]
fn a_broken_source_reports_its_log() {
    if !nvrtc::library_present() {
        println!("SKIPPED: libnvrtc could not be loaded");
        return;
    }
    let bad = kernels::device::cuda::KernelSource {
        name: "broken",
        source: "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }",
        entry_points: &["broken"],
    };
    let e = nvrtc::compile(&bad, ARCH).unwrap_err().to_string();
    assert!(e.contains("broken.cu does not compile for sm_90"), "{e}");
    assert!(e.contains("undefined_name"), "{e}");
    assert!(nvrtc::compile(&SOURCES[0], "compute_90").is_err());
}

/// The spill check is live: a kernel held to 32 registers with 96 live values spills, and the
/// parsed report says so (2,428 bytes each way with NVRTC 13.0).
#[test]
fn the_spill_check_sees_a_kernel_that_spills() {
    if !nvrtc::library_present() {
        println!("SKIPPED: libnvrtc could not be loaded");
        return;
    }
    let spill = kernels::device::cuda::KernelSource {
        name: "spill",
        source: r#"extern "C" __global__ void __launch_bounds__(1024, 2) spill(float* x, int n) {
    float a[96];
#pragma unroll
    for (int i = 0; i < 96; i++) a[i] = x[i * n + threadIdx.x];
#pragma unroll
    for (int k = 0; k < 8; k++) {
#pragma unroll
        for (int i = 0; i < 96; i++) a[i] = a[i] * a[(i + k + 1) % 96] + 1.0f;
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 96; i++) s += a[i];
    x[threadIdx.x] = s;
}"#,
        entry_points: &["spill"],
    };
    let c = nvrtc::compile(&spill, ARCH).expect("compiles");
    let r = &c.kernels[0];
    println!("{r:?}");
    assert_eq!(r.function, "spill");
    assert!(
        r.spill_store_bytes > 0 && r.spill_load_bytes > 0,
        "{}",
        c.log
    );
}

/// The kernel cache with the real compiler: a first pass compiles and stores every source, a
/// second loads the same bytes back without compiling, and a damaged file is compiled again.
#[test]
fn compiled_kernels_are_cached_and_loaded_back() {
    use kernels::device::kernel_cache::KernelCache;
    use kernels::device::nvrtc::CacheUse;
    if !nvrtc::library_present() {
        println!("SKIPPED: libnvrtc could not be loaded");
        return;
    }
    let dir = std::env::temp_dir().join(format!("phalanx-kcache-nvrtc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = KernelCache::at(&dir);
    let t0 = std::time::Instant::now();
    let first: Vec<Vec<u8>> = SOURCES
        .iter()
        .map(|s| {
            let (cubin, used) = nvrtc::compile_cached(s, ARCH, Some(&cache)).expect("compiles");
            assert_eq!(used, CacheUse::Miss { stored: Ok(()) }, "{}", s.name);
            cubin
        })
        .collect();
    let compiled = t0.elapsed();
    let t1 = std::time::Instant::now();
    for (s, want) in SOURCES.iter().zip(&first) {
        let (cubin, used) = nvrtc::compile_cached(s, ARCH, Some(&cache)).expect("loads");
        assert_eq!(used, CacheUse::Hit, "{}", s.name);
        assert_eq!(&cubin, want, "{}: the cached cubin differs", s.name);
    }
    let loaded = t1.elapsed();
    println!(
        "{} sources: compiled and stored in {:.2} s, loaded from the cache in {:.3} s",
        SOURCES.len(),
        compiled.as_secs_f64(),
        loaded.as_secs_f64()
    );
    // a damaged file is a miss: compiled again and repaired
    let victim = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .next()
        .expect("a cached file");
    std::fs::write(&victim, b"damaged").unwrap();
    let misses = SOURCES
        .iter()
        .filter(|s| {
            let (_, used) = nvrtc::compile_cached(s, ARCH, Some(&cache)).expect("compiles");
            used != CacheUse::Hit
        })
        .count();
    assert_eq!(misses, 1, "exactly the damaged source compiles again");
    let _ = std::fs::remove_dir_all(&dir);
}
