//! Hugging Face DeepseekV3 directories: config.json plus model.safetensors (or an index of shards),
//! fp32/bf16/fp16, per-expert or fused expert tensors, loaded into a phalanx model by tensor name.

use kernels::model::{DeepSeekV3, ModelConfig};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A Hugging Face directory that cannot be loaded, naming the file and tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error(transparent)]
    Config(#[from] kernels::model::ConfigError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

/// What a load did: tensors read from disk and tensors left at their fresh initialisation.
#[derive(Clone, Debug, Default)]
pub struct HfLoadReport {
    pub loaded: usize,
    pub fresh: Vec<String>,
    pub ignored: Vec<String>,
}

fn file_err(path: &Path, message: impl Into<String>) -> HfError {
    HfError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn to_f32(path: &Path, name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, HfError> {
    match dtype {
        Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Dtype::BF16 => Ok(data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        Dtype::F16 => Ok(data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        other => Err(file_err(
            path,
            format!("tensor {name} has dtype {other:?}; phalanx reads F32, BF16 and F16"),
        )),
    }
}

/// The safetensors files of a directory: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .map_err(|e| file_err(&index, format!("no model.safetensors and no index ({e})")))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| file_err(&index, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| file_err(&index, "no `weight_map` object"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Loads a Hugging Face DeepseekV3 directory. Tensors the directory lacks are allowed only for
/// MTP layers and routing biases (they keep the fresh initialisation drawn from `seed`).
pub fn load_dir(dir: &Path, seed: u64) -> Result<(DeepSeekV3, HfLoadReport), HfError> {
    let cfg = ModelConfig::load_hf_json(&dir.join("config.json"))?;
    let mut model = DeepSeekV3::new(&cfg, cfg.initializer_range, seed);
    let mut report = HfLoadReport::default();
    let mut seen = vec![false; model.params.len()];
    for path in shard_files(dir)? {
        let bytes =
            std::fs::read(&path).map_err(|e| file_err(&path, format!("cannot read: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| file_err(&path, format!("not a safetensors file: {e}")))?;
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        for name in names {
            let view = st
                .tensor(&name)
                .map_err(|e| file_err(&path, format!("{name}: {e}")))?;
            let values = to_f32(&path, &name, view.dtype(), view.data())?;
            let shape = view.shape().to_vec();
            for (target, data, tshape) in split_fused(&name, values, &shape) {
                let Some(id) = model.params.id(&target) else {
                    report.ignored.push(target);
                    continue;
                };
                let want = &model.params.tensors[id.0].shape;
                if *want != tshape {
                    return Err(file_err(
                        &path,
                        format!(
                            "tensor {target} has shape {tshape:?}, the config implies {want:?}"
                        ),
                    ));
                }
                model.params.tensors[id.0].data = data;
                seen[id.0] = true;
                report.loaded += 1;
            }
        }
    }
    for (i, name) in model.params.names.iter().enumerate() {
        if seen[i] {
            continue;
        }
        let mtp = (cfg.num_hidden_layers..cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
            .any(|l| name.starts_with(&format!("model.layers.{l}.")));
        if mtp || name.ends_with("e_score_correction_bias") {
            report.fresh.push(name.clone());
        } else {
            return Err(file_err(
                dir,
                format!("tensor {name} is missing from the directory's safetensors"),
            ));
        }
    }
    Ok((model, report))
}

/// Splits transformers 5.x fused expert tensors (`mlp.experts.gate_up_proj` [E, 2I, H] and
/// `mlp.experts.down_proj` [E, H, I]) into per-expert [out, in] matrices; passes others through.
fn split_fused(
    name: &str,
    values: Vec<f32>,
    shape: &[usize],
) -> Vec<(String, Vec<f32>, Vec<usize>)> {
    let fused = |suffix: &str| {
        name.strip_suffix(suffix)
            .filter(|p| p.ends_with(".mlp.experts"))
    };
    if shape.len() == 3 {
        if let Some(prefix) = fused(".gate_up_proj").or_else(|| fused(".gate_up_proj.weight")) {
            let (e, two_i, h) = (shape[0], shape[1], shape[2]);
            let i = two_i / 2;
            let mut out = Vec::new();
            for x in 0..e {
                let block = &values[x * two_i * h..(x + 1) * two_i * h];
                out.push((
                    format!("{prefix}.{x}.gate_proj.weight"),
                    block[..i * h].to_vec(),
                    vec![i, h],
                ));
                out.push((
                    format!("{prefix}.{x}.up_proj.weight"),
                    block[i * h..].to_vec(),
                    vec![i, h],
                ));
            }
            return out;
        }
        if let Some(prefix) = fused(".down_proj").or_else(|| fused(".down_proj.weight")) {
            let (e, h, i) = (shape[0], shape[1], shape[2]);
            return (0..e)
                .map(|x| {
                    (
                        format!("{prefix}.{x}.down_proj.weight"),
                        values[x * h * i..(x + 1) * h * i].to_vec(),
                        vec![h, i],
                    )
                })
                .collect();
        }
    }
    vec![(name.to_string(), values, shape.to_vec())]
}

/// Tensors by name: shape and values.
pub type NamedTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Tensor name → values of a safetensors file, as f32 (for fixtures and tests).
pub fn read_f32_tensors(path: &Path) -> Result<NamedTensors, HfError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(path, format!("not a safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for name in st.names() {
        let view = st
            .tensor(name)
            .map_err(|e| file_err(path, format!("{name}: {e}")))?;
        let values = match view.dtype() {
            Dtype::I64 => view
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            Dtype::I32 => view
                .data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            d => to_f32(path, name, d, view.data())?,
        };
        out.insert(name.to_string(), (view.shape().to_vec(), values));
    }
    Ok(out)
}

/// Writes a Hugging Face DeepseekV3 directory: `config.json` (the model's keys plus
/// `architectures`, `model_type` and `torch_dtype`) and one `model.safetensors` of F32 tensors
/// `(name, shape, values)` in the given order. The directory is created; existing files of
/// those names are replaced.
pub fn write_dir(
    dir: &Path,
    cfg: &ModelConfig,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<(), HfError> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, format!("cannot create: {e}")))?;
    let mut json = serde_json::to_value(cfg).map_err(|e| file_err(dir, e.to_string()))?;
    if let Some(m) = json.as_object_mut() {
        m.insert(
            "architectures".into(),
            serde_json::json!(["DeepseekV3ForCausalLM"]),
        );
        m.insert("model_type".into(), serde_json::json!("deepseek_v3"));
        m.insert("torch_dtype".into(), serde_json::json!("float32"));
        if m.get("rope_scaling").is_some_and(|v| v.is_null()) {
            m.remove("rope_scaling");
        }
    }
    let config = dir.join("config.json");
    let text = serde_json::to_string_pretty(&json).map_err(|e| file_err(&config, e.to_string()))?;
    std::fs::write(&config, text).map_err(|e| file_err(&config, format!("cannot write: {e}")))?;
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| file_err(dir, format!("tensor {name}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let path = dir.join("model.safetensors");
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect();
    safetensors::serialize_to_file(views, Some(meta), &path)
        .map_err(|e| file_err(&path, format!("cannot write: {e}")))
}
