//! LoRA adapters (Hu et al. 2021, as PEFT implements them): a targeted linear layer computes
//! `W x + s · B (A x)` with `A: [r, in]`, `B: [out, r]` and `s = α / r` (`α / √r` with rsLoRA). The base weights
//! stay frozen; only `A` and `B` train. Names follow PEFT's saved adapters
//! (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), so `adapter_model.safetensors` opens in PEFT.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::rollout::rng::{RowKey, RowRng};

/// The decoder's linear layers, in the order a layer holds them: what `lora.targets` may name.
pub const LINEAR_MODULES: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Checkpoint file of the adapters, in PEFT's key names.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// PEFT's `LoraConfig`, as `save_pretrained` writes it.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// Everything the model needs to build its adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// PEFT's `lora_dropout` (recorded in `adapter_config.json`): see [`DropoutControl`].
    pub dropout: f64,
    /// Module names, in [`LINEAR_MODULES`] order.
    pub targets: Vec<String>,
    pub rslora: bool,
    /// `lora.base_dtype`: the dtype the frozen base's linear weights are held in (`None`: the model's), applied
    /// when trainable adapters are added. Not part of PEFT's config: the adapters are the same either way.
    pub base_dtype: Option<DType>,
    /// `run.seed`: A's initialisation draws from streams keyed by it.
    pub seed: u64,
    /// The base model's id, for `adapter_config.json`'s `base_model_name_or_path`.
    pub base_model: String,
}

impl LoraSpec {
    /// The factor of the adapter's output: α/r, or α/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    pub fn targets(&self, module: &str) -> bool {
        self.targets.iter().any(|t| t == module)
    }

    /// PEFT's `adapter_config.json` for these adapters.
    pub fn peft_config(&self) -> serde_json::Value {
        serde_json::json!({
            "alpha_pattern": {},
            "base_model_name_or_path": self.base_model,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.rank,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.rslora,
        })
    }
}

/// The adapters in `dir` (`adapter_config.json` + `adapter_model.safetensors`, as a LoRA run's checkpoint holds
/// them), if it has any. Only what this implementation computes is accepted: plain LoRA on the decoder's linear
/// layers, no bias, no per-layer patterns.
pub fn read_adapters(dir: &Path, device: &Device, dtype: DType) -> Result<Option<(LoraSpec, HashMap<String, Tensor>)>> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let what = path.display().to_string();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path)?).with_context(|| format!("{what} is not valid JSON"))?;
    if v["peft_type"] != "LORA" {
        bail!("{what}: peft_type {} is not \"LORA\"", v["peft_type"]);
    }
    let rank = v["r"].as_u64().filter(|r| *r > 0).with_context(|| format!("{what}: `r` must be an integer ≥ 1"))?;
    let alpha = v["lora_alpha"].as_f64().with_context(|| format!("{what}: `lora_alpha` must be a number"))?;
    let targets: Vec<String> = match &v["target_modules"] {
        serde_json::Value::Array(items) => items.iter().filter_map(|i| i.as_str().map(str::to_string)).collect(),
        serde_json::Value::String(s) if s == "all-linear" => LINEAR_MODULES.iter().map(|m| m.to_string()).collect(),
        other => bail!("{what}: target_modules {other} is not a list of module names"),
    };
    if let Some(bad) = targets.iter().find(|t| !LINEAR_MODULES.contains(&t.as_str())) {
        bail!("{what}: target module `{bad}` is not one of {}", LINEAR_MODULES.join(", "));
    }
    if v.get("bias").is_some_and(|b| b != "none") {
        bail!("{what}: bias {} is not supported (only \"none\")", v["bias"]);
    }
    // PEFT options that change what the adapters compute; their defaults (absent, null, false, {}) are fine.
    for key in [
        "use_dora",
        "lora_bias",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "exclude_modules",
    ] {
        let ok = match v.get(key) {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => true,
            Some(serde_json::Value::Object(m)) => m.is_empty(),
            Some(serde_json::Value::Array(a)) => a.is_empty(),
            Some(_) => false,
        };
        if !ok {
            bail!("{what}: `{key}` = {} is not supported (only plain LoRA on the decoder's linear layers)", v[key]);
        }
    }
    let spec = LoraSpec {
        rank: rank as usize,
        alpha,
        dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
        targets: LINEAR_MODULES.iter().filter(|m| targets.iter().any(|t| t == *m)).map(|m| m.to_string()).collect(),
        rslora: v["use_rslora"].as_bool().unwrap_or(false),
        base_dtype: None,
        seed: 0,
        base_model: v["base_model_name_or_path"].as_str().unwrap_or_default().to_string(),
    };
    let file = dir.join(ADAPTER_FILE);
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .with_context(|| format!("cannot read the adapters {}", file.display()))?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?.to_device(device)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Ok(Some((spec, tensors)))
}

/// The PEFT name of a targeted layer's adapter matrix: `which` is `"lora_A"` or `"lora_B"`, `module` the layer's HF
/// path inside `model.layers.N` (`self_attn.q_proj`).
pub fn peft_name(layer: usize, module: &str, which: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{module}.{which}.weight")
}

/// PEFT's initialisation of A `[rank, in]`: `kaiming_uniform_(a = √5)`, i.e. U(-b, b) with
/// b = √(6 / ((1 + 5) · in)) = 1/√in, drawn from the stream keyed by (seed, layer, module index).
pub fn kaiming_uniform(seed: u64, layer: usize, module: usize, rank: usize, in_dim: usize) -> Result<Vec<f32>> {
    // `step` = u64::MAX - 1 keeps these streams apart from sampling's and from the built-in models' weights.
    let mut rng = RowRng::new(RowKey { seed, step: u64::MAX - 1, prompt: layer as u64, sample: module as u64 });
    let bound = 1.0 / (in_dim as f64).sqrt();
    Ok((0..rank * in_dim).map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32).collect())
}

/// LoRA dropout (PEFT's `lora_dropout`): in a training forward, each adapter reads its input with every element
/// zeroed with probability p and the rest scaled by 1/(1 − p), a mask of its own, as `nn.Dropout` in train mode.
/// Rollouts, stored log-probs and the reference (graph-free views, or the base with the adapters off) read no
/// dropout.
///
/// Masks are functions of a key, never of generator state: a step's training forwards are counted from
/// [`DropoutControl::begin_step`] and forward `i` of step `t` draws from (seed, t, i); each adapter's mask from
/// that key, its layer and module, row by row. So a recomputed forward (gradient checkpointing, the backward)
/// draws the same mask, and a resumed run the same masks as an uninterrupted one.
#[derive(Debug)]
pub struct DropoutControl {
    p: f64,
    state: std::sync::Mutex<DropoutState>,
}

#[derive(Debug, Default)]
struct DropoutState {
    /// (seed, step) of the step being trained; `None` before the first [`DropoutControl::begin_step`].
    step: Option<(u64, u64)>,
    /// Training forwards so far in this step.
    forwards: u64,
    /// The key of the training forward under way, if one is.
    current: Option<u64>,
}

/// One training forward's dropout: what an adapter needs to draw its mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutKey {
    pub p: f64,
    pub key: u64,
}

impl DropoutControl {
    pub fn new(p: f64) -> Self {
        Self { p, state: Default::default() }
    }

    /// Start counting the training forwards of step `step` (streams keyed by `seed`).
    pub fn begin_step(&self, seed: u64, step: u64) {
        *self.state.lock().expect("dropout lock") = DropoutState { step: Some((seed, step)), ..Default::default() };
    }

    /// Open the next training forward: adapters read [`Self::current`] until [`Self::end_forward`]. Without a
    /// step begun, no dropout (a forward outside training).
    pub fn begin_forward(&self) {
        let mut s = self.state.lock().expect("dropout lock");
        if let Some((seed, step)) = s.step {
            let key = RowRng::new(RowKey { seed, step, prompt: u64::MAX - 2, sample: s.forwards }).next_u64();
            s.forwards += 1;
            s.current = Some(key);
        }
    }

    pub fn end_forward(&self) {
        self.state.lock().expect("dropout lock").current = None;
    }

    /// The training forward under way, if any.
    pub fn current(&self) -> Option<DropoutKey> {
        self.state.lock().expect("dropout lock").current.map(|key| DropoutKey { p: self.p, key })
    }
}

/// The dropout mask `[rows, cols]` of adapter `module` (its index in [`LINEAR_MODULES`]) of layer `layer` in the
/// forward `key`: 0 with probability p, else 1/(1 − p). Each row from its own stream, drawn in parallel.
pub fn dropout_mask(key: DropoutKey, layer: usize, module: usize, rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let keep = (1.0 / (1.0 - key.p)) as f32;
    let mut mask = vec![0f32; rows * cols];
    mask.par_chunks_mut(cols.max(1)).enumerate().for_each(|(row, out)| {
        let stream = (layer as u64) << 32 | module as u64;
        let mut rng = RowRng::new(RowKey { seed: key.key, step: stream, prompt: row as u64, sample: 0 });
        for m in out {
            if rng.next_f64() >= key.p {
                *m = keep;
            }
        }
    });
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaiming_draws_are_bounded_seeded_and_per_layer() {
        let a = kaiming_uniform(0, 0, 0, 4, 64).unwrap();
        assert_eq!(a.len(), 256);
        assert!(a.iter().all(|x| x.abs() <= 0.125));
        // Spread over the whole interval: the variance of U(-b, b) is b²/3.
        let var = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / a.len() as f64;
        assert!((var - 0.125f64.powi(2) / 3.0).abs() < 0.002, "{var}");
        assert_eq!(a, kaiming_uniform(0, 0, 0, 4, 64).unwrap());
        assert_ne!(a, kaiming_uniform(1, 0, 0, 4, 64).unwrap());
        assert_ne!(a, kaiming_uniform(0, 1, 0, 4, 64).unwrap());
        assert_ne!(a, kaiming_uniform(0, 0, 1, 4, 64).unwrap());
    }

    #[test]
    fn scale_is_alpha_over_rank_or_its_root() {
        let mut s = LoraSpec {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec!["q_proj".into()],
            rslora: false,
            base_dtype: None,
            seed: 0,
            base_model: "builtin:tiny".into(),
        };
        assert_eq!(s.scale(), 2.0);
        s.rslora = true;
        assert_eq!(s.scale(), 4.0);
        assert_eq!(
            peft_name(3, "self_attn.q_proj", "lora_A"),
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
        );
    }

    /// The mask keeps about 1 − p of the elements, scaled by 1/(1 − p); it is a function of its key, layer,
    /// module and row alone; forwards of one step get different keys, a step begun again the same ones.
    #[test]
    fn dropout_masks_are_keyed_and_scaled() {
        let key = DropoutKey { p: 0.25, key: 42 };
        let m = dropout_mask(key, 3, 1, 200, 100);
        let kept = m.iter().filter(|v| **v != 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.75).abs() < 0.02, "{kept}");
        assert!(m.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6));
        assert_eq!(m, dropout_mask(key, 3, 1, 200, 100));
        // A row's mask does not depend on how many rows there are.
        assert_eq!(m[..100 * 100], dropout_mask(key, 3, 1, 100, 100)[..]);
        assert_ne!(m, dropout_mask(key, 3, 2, 200, 100));
        assert_ne!(m, dropout_mask(key, 4, 1, 200, 100));
        assert_ne!(m, dropout_mask(DropoutKey { key: 43, ..key }, 3, 1, 200, 100));
        let ctl = DropoutControl::new(0.25);
        ctl.begin_forward();
        assert_eq!(ctl.current(), None, "no step begun: no dropout");
        let keys = |ctl: &DropoutControl, step| {
            ctl.begin_step(7, step);
            (0..2)
                .map(|_| {
                    ctl.begin_forward();
                    let k = ctl.current().unwrap();
                    ctl.end_forward();
                    assert_eq!(ctl.current(), None);
                    k
                })
                .collect::<Vec<_>>()
        };
        let first = keys(&ctl, 5);
        assert_ne!(first[0], first[1]);
        assert_ne!(first, keys(&ctl, 6));
        assert_eq!(first, keys(&ctl, 5));
    }
}
