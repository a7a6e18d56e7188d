//! Picks the GEMM backend of `kernels::matmul` at build time: Debian's OpenBLAS when its shared
//! library is installed (`apt-get install libopenblas-serial-dev`), else the pure-Rust `gemm` crate.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(openblas)");
    println!("cargo::rerun-if-env-changed=PHALANX_GEMM");
    let forced = std::env::var("PHALANX_GEMM").ok();
    let dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ];
    let found = dirs
        .iter()
        .find(|d| std::path::Path::new(d).join("libopenblas.so").exists());
    for d in dirs {
        println!("cargo::rerun-if-changed={d}/libopenblas.so");
    }
    match (forced.as_deref(), found) {
        (Some("gemm"), _) | (None, None) => {}
        (Some("openblas") | None, Some(dir)) => {
            println!("cargo::rustc-link-search=native={dir}");
            println!("cargo::rustc-link-lib=dylib=openblas");
            println!("cargo::rustc-cfg=openblas");
        }
        (Some("openblas"), None) => {
            panic!("PHALANX_GEMM=openblas but no libopenblas.so was found in {dirs:?}")
        }
        (Some(other), _) => panic!("PHALANX_GEMM={other}: expected `openblas` or `gemm`"),
    }
}
