//! FP8 throughput on this machine (`cargo bench -p kernels --bench fp8`): quantise+encode of a
//! 64 MiB f32 input against memcpy, and the FP8 Fprop GEMM against the f32 GEMM at 1024³.

fn main() {
    print!("{}", kernels::fp8::bench::report(4096, 4096, 1024));
}
