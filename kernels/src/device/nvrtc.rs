//! NVRTC compilation of the CUDA C kernels (feature `cuda`): each source of `device::cuda` to a
//! cubin for one real architecture (`sm_90` for the H200), with ptxas's `-v` report parsed for
//! registers and spills. libnvrtc is loaded at run time (cudarc's dynamic loading);
//! `library_present` says whether it can be, without the panic cudarc raises when it cannot.
//!
//! A cubin, not PTX: PTX from a newer NVRTC can be refused by an older driver, a cubin for the
//! device's own architecture cannot. Options: no FMA contraction (`--fmad=false`, as Rust does not
//! contract, so the CPU's operation order gives the CPU's bits) and IEEE division and square root
//! (NVRTC's defaults). Headers (`cuda_fp8.h` and the CCCL headers it pulls in) come from
//! `PHALANX_CUDA_INCLUDE` (directories separated by `:`), else `/usr/local/cuda/include` and
//! `/usr/local/cuda/include/cccl`. [`compile_cached`] keeps the cubins in a `KernelCache`.

use super::cuda::{KernelSource, PtxasReport, SOURCES, parse_ptxas_log};
use super::kernel_cache::KernelCache;
use cudarc::nvrtc::{result, sys};
use std::ffi::CString;
use std::path::PathBuf;

/// Why a source did not compile.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("libnvrtc could not be loaded (searched {0}); put its directory on LD_LIBRARY_PATH")]
    NoLibrary(String),
    #[error("{0:?} is not a real GPU architecture such as sm_90 (a cubin needs one)")]
    Arch(String),
    #[error("{name}.cu does not compile for {arch}:\n{log}")]
    Compile {
        name: String,
        arch: String,
        log: String,
    },
    #[error("NVRTC failed at {step} for {name}.cu: {err}")]
    Nvrtc {
        name: String,
        step: &'static str,
        err: String,
    },
}

/// One compiled source.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub name: &'static str,
    pub cubin: Vec<u8>,
    /// The NVRTC program log (ptxas's `-v` report and any warnings).
    pub log: String,
    /// Per kernel: registers, stack and spills.
    pub kernels: Vec<PtxasReport>,
}

/// Whether libnvrtc can be loaded here (tries the names cudarc tries; loads nothing else).
pub fn library_present() -> bool {
    // SAFETY: only dlopens the candidate library names
    unsafe { sys::is_culib_present() }
}

/// The loaded libnvrtc's version (major, minor).
pub fn version() -> Result<(i32, i32), CompileError> {
    let (mut major, mut minor) = (0, 0);
    ensure_library()?;
    // SAFETY: two out-pointers to live integers
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_err("", "nvrtcVersion", e))?;
    Ok((major, minor))
}

/// The include directories passed to NVRTC (see the module doc).
pub fn include_dirs() -> Vec<PathBuf> {
    match std::env::var_os("PHALANX_CUDA_INCLUDE") {
        Some(v) if !v.is_empty() => std::env::split_paths(&v).collect(),
        _ => ["/usr/local/cuda/include", "/usr/local/cuda/include/cccl"]
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .collect(),
    }
}

/// NVRTC options for a cubin of `arch`.
pub fn options(arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--fmad=false".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    o.extend(include_dirs().iter().map(|d| format!("-I{}", d.display())));
    o
}

fn ensure_library() -> Result<(), CompileError> {
    if library_present() {
        Ok(())
    } else {
        Err(CompileError::NoLibrary(super::searched_names("nvrtc")))
    }
}

fn nvrtc_err(name: &str, step: &'static str, e: result::NvrtcError) -> CompileError {
    CompileError::Nvrtc {
        name: name.to_string(),
        step,
        err: e.to_string(),
    }
}

/// Every kernel source compiled for `arch` (e.g. "sm_90"); stops at the first that fails.
pub fn compile_for(arch: &str) -> Result<Vec<Compiled>, CompileError> {
    SOURCES.iter().map(|s| compile(s, arch)).collect()
}

/// One source compiled to a cubin for `arch`.
pub fn compile(src: &KernelSource, arch: &str) -> Result<Compiled, CompileError> {
    let digits = arch.strip_prefix("sm_").unwrap_or("");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(CompileError::Arch(arch.to_string()));
    }
    ensure_library()?;
    let name = src.name;
    let err = |step, e| nvrtc_err(name, step, e);
    let text = CString::new(src.full_source()).expect("kernel sources hold no NUL");
    let file = CString::new(format!("{name}.cu")).expect("no NUL");
    let prog = result::create_program(&text, Some(&file)).map_err(|e| err("create", e))?;
    // SAFETY: `prog` is live until destroyed below; `text` and `file` outlive it
    let compiled = unsafe { result::compile_program(prog, &options(arch)) };
    // SAFETY: as above
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let cubin = match compiled {
        // SAFETY: compiled successfully; `prog` is live
        Ok(()) => unsafe { cubin(prog) }.map_err(|e| err("nvrtcGetCUBIN", e)),
        Err(_) => Err(CompileError::Compile {
            name: name.to_string(),
            arch: arch.to_string(),
            log: log.clone(),
        }),
    };
    // SAFETY: created above and not destroyed yet
    unsafe { result::destroy_program(prog) }.map_err(|e| err("destroy", e))?;
    Ok(Compiled {
        name,
        cubin: cubin?,
        kernels: parse_ptxas_log(&log),
        log,
    })
}

/// Where a cubin came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheUse {
    /// Loaded from the cache.
    Hit,
    /// Compiled; then stored in the cache, or why not.
    Miss { stored: Result<(), String> },
    /// Compiled; no cache.
    Off,
}

/// The kernel cache's key of `src` compiled for `arch` by the loaded NVRTC with [`options`].
pub fn cache_key(src: &KernelSource, arch: &str) -> Result<String, CompileError> {
    let opts = options(arch);
    Ok(KernelCache::key(
        src.name,
        &src.full_source(),
        arch,
        &opts,
        version()?,
    ))
}

/// `src`'s cubin for `arch`: from `cache` when it holds one for this exact source, architecture,
/// option list and NVRTC version, else compiled (and stored there).
pub fn compile_cached(
    src: &KernelSource,
    arch: &str,
    cache: Option<&KernelCache>,
) -> Result<(Vec<u8>, CacheUse), CompileError> {
    let Some(cache) = cache else {
        return Ok((compile(src, arch)?.cubin, CacheUse::Off));
    };
    let key = cache_key(src, arch)?;
    if let Some(cubin) = cache.load(src.name, &key) {
        return Ok((cubin, CacheUse::Hit));
    }
    let cubin = compile(src, arch)?.cubin;
    let stored = cache
        .store(src.name, &key, &cubin)
        .map_err(|e| format!("{}: {e}", cache.path(src.name, &key).display()));
    Ok((cubin, CacheUse::Miss { stored }))
}

/// The cubin of a compiled program (cudarc 0.19 wraps only the PTX getter, so the two sys calls).
///
/// # Safety
/// `prog` must be a live program that compiled for a real architecture.
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, result::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: per the contract; out-pointer to a live usize
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds `size` bytes
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }.result()?;
    Ok(buf)
}
