//! The CUDA C kernels of the GPU backend (issue 12), as source text: each `.cu` file beside this
//! one mirrors a CPU op of `kernels::ops` or `kernels::fp8` (its `//` header names the function),
//! with the entry points it exports. `device::nvrtc` (feature `cuda`) compiles them; `launch`
//! (feature `cuda`) loads and launches them.
//!
//! **Compile-checked for `sm_90` only** (`kernels/tests/nvrtc_compile.rs`); none has run on a
//! GPU: parity with the CPU (`kernels/tests/gpu_parity.rs`) and speed are still to be measured.

#[cfg(feature = "cuda")]
pub mod attention_gemm;
#[cfg(feature = "cuda")]
pub mod backend;
#[cfg(feature = "cuda")]
mod fp8_grouped;
#[cfg(feature = "cuda")]
pub mod fp8_linear;
#[cfg(feature = "cuda")]
mod gemm;
#[cfg(feature = "cuda")]
mod grouped;
#[cfg(feature = "cuda")]
pub mod launch;
#[cfg(feature = "cuda")]
mod open;
#[cfg(feature = "cuda")]
pub mod route;

/// Prepended to every source before compilation (sources do not `#include` it): element types
/// and the fixed-tree block reductions.
pub const PRELUDE: &str = include_str!("common.cuh");

/// One CUDA C source and the `extern "C"` kernels it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File stem, also the NVRTC program name (`<name>.cu`).
    pub name: &'static str,
    pub source: &'static str,
    pub entry_points: &'static [&'static str],
}

impl KernelSource {
    /// The text NVRTC compiles: the prelude, then the source.
    pub fn full_source(&self) -> String {
        format!("{PRELUDE}\n// ---- {}.cu ----\n{}", self.name, self.source)
    }
}

macro_rules! source {
    ($name:literal, [$($entry:literal),+ $(,)?]) => {
        KernelSource {
            name: $name,
            source: include_str!(concat!($name, ".cu")),
            entry_points: &[$($entry),+],
        }
    };
}

/// Every kernel source of the backend.
pub const SOURCES: &[KernelSource] = &[
    source!(
        "fp8_quant",
        [
            "fp8_quantize_1x128",
            "fp8_quantize_128x1",
            "fp8_quantize_128x1_segmented",
            "fp8_quantize_128x128",
            "fp8_quantize_128x128_batched",
            "fp8_dequantize"
        ]
    ),
    source!(
        "rmsnorm",
        [
            "rmsnorm_forward",
            "rmsnorm_backward_input",
            "rmsnorm_backward_weight"
        ]
    ),
    source!("swiglu", ["swiglu_forward", "swiglu_backward_input"]),
    source!("rope", ["rope_forward", "rope_backward_input"]),
    source!(
        "cross_entropy",
        [
            "cross_entropy_forward_rows",
            "cross_entropy_sum",
            "cross_entropy_backward_input"
        ]
    ),
    source!(
        "adamw",
        [
            "adamw_step_f32",
            "adamw_step_bf16",
            "adamw_many_f32",
            "adamw_many_bf16"
        ]
    ),
    source!("grad_norm", ["grad_norm_chunks"]),
    source!(
        "embedding",
        ["embedding_forward", "embedding_backward_weight"]
    ),
    source!(
        "attention",
        [
            "attention_forward",
            "attention_backward_dot",
            "attention_backward_dkdv",
            "attention_backward_dq"
        ]
    ),
    source!(
        "attention_gemm",
        ["attention_softmax_rows", "attention_softmax_backward_rows"]
    ),
    source!("fp8_gemm", ["fp8_gemm_promoted"]),
    source!("fp8_pack", ["fp8_pack_codes", "fp8_pack_scales"]),
    source!("fp8_grouped", ["fp8_grouped_gemm"]),
    source!(
        "router",
        [
            "moe_route",
            "moe_plan_count",
            "moe_plan_fill",
            "moe_plan_rows",
            "moe_route_backward",
            "moe_balance_forward",
            "moe_balance_backward"
        ]
    ),
    source!(
        "tensor",
        [
            "tensor_add",
            "tensor_scale",
            "tensor_copy",
            "tensor_copy_cols",
            "tensor_heads",
            "tensor_broadcast_heads",
            "tensor_sum_heads",
            "sigmoid_forward",
            "sigmoid_backward_input",
            "tensor_to_bf16",
            "tensor_to_bf16_batched"
        ]
    ),
    source!(
        "moe",
        [
            "moe_dispatch_forward",
            "moe_dispatch_backward_input",
            "moe_combine_forward",
            "moe_combine_backward_input"
        ]
    ),
];

/// Register use and spills of one kernel, read from ptxas's `-v` report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PtxasReport {
    pub function: String,
    pub registers: u32,
    pub stack_bytes: u64,
    pub spill_store_bytes: u64,
    pub spill_load_bytes: u64,
}

/// Parses ptxas `-v` output (the NVRTC program log): a "Function properties for F" line, then
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers".
pub fn parse_ptxas_log(log: &str) -> Vec<PtxasReport> {
    let mut out: Vec<PtxasReport> = Vec::new();
    let number_before = |line: &str, unit: &str| -> Option<u64> {
        let head = &line[..line.find(unit)?];
        head.split(|c: char| !c.is_ascii_digit())
            .rfind(|w| !w.is_empty())?
            .parse()
            .ok()
    };
    for line in log.lines() {
        if let Some(f) = line.split("Function properties for ").nth(1) {
            out.push(PtxasReport {
                function: f.trim().to_string(),
                ..PtxasReport::default()
            });
        } else if let Some(r) = out.last_mut() {
            if line.contains("spill stores") {
                r.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                r.registers = number_before(line, " registers").unwrap_or(0) as u32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the `extern "C" __global__ void [__launch_bounds__(…)] NAME(` kernels of a
    /// source, in order.
    fn kernel_names(source: &str) -> Vec<&str> {
        let def = "extern \"C\" __global__ void ";
        source
            .match_indices(def)
            .map(|(at, _)| {
                let mut rest = source[at + def.len()..].trim_start();
                if let Some(r) = rest.strip_prefix("__launch_bounds__(") {
                    rest = r[r.find(')').expect("closed launch bounds") + 1..].trim_start();
                }
                &rest[..rest.find('(').expect("a parameter list")]
            })
            .collect()
    }

    #[test]
    fn kernel_names_read_launch_bounds() {
        let src = "extern \"C\" __global__ void a(int x) {}\n\
            extern \"C\" __global__ void __launch_bounds__(256)\nb(float* y) {}";
        assert_eq!(kernel_names(src), ["a", "b"]);
    }

    #[test]
    fn every_source_defines_its_entry_points_and_names_its_cpu_twin() {
        for s in SOURCES {
            assert!(
                s.source.starts_with("// "),
                "{}.cu lacks its header",
                s.name
            );
            assert!(s.source.contains("Mirrors kernels/src/"), "{}", s.name);
            assert!(s.source.contains("never run on a GPU"), "{}", s.name);
            assert_eq!(
                kernel_names(s.source),
                s.entry_points,
                "{}.cu: the kernels it defines are not its entry points",
                s.name
            );
            let defined = s.source.matches("extern \"C\" __global__").count();
            assert_eq!(
                defined,
                s.entry_points.len(),
                "{}: unlisted kernels",
                s.name
            );
            assert!(s.full_source().starts_with(PRELUDE));
        }
    }

    #[test]
    fn reads_ptxas_reports() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'rmsnorm_forward' for 'sm_90'\n\
            ptxas info    : Function properties for rmsnorm_forward\n    \
            8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 18 registers, used 1 barriers, 128 bytes smem, 392 bytes cmem[0]\n\
            ptxas info    : Function properties for adamw_step_f32\n    \
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 22 registers, used 0 barriers, 412 bytes cmem[0]\n";
        let r = parse_ptxas_log(log);
        assert_eq!(
            r,
            vec![
                PtxasReport {
                    function: "rmsnorm_forward".into(),
                    registers: 18,
                    stack_bytes: 8,
                    spill_store_bytes: 4,
                    spill_load_bytes: 12,
                },
                PtxasReport {
                    function: "adamw_step_f32".into(),
                    registers: 22,
                    ..PtxasReport::default()
                },
            ]
        );
    }
}
