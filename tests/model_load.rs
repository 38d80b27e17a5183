//! Loading models the ways users have them, and the errors bad inputs give: every message names the file.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safe::model::load::hub;
use safe::model::{attention_mask, positions_from_mask, CausalLm, HfConfig, LoadedModel, ModelSource};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_err(id: &str) -> String {
    let src = match ModelSource::parse(id, None) {
        Ok(s) => s,
        Err(e) => return format!("{e:#}"),
    };
    match LoadedModel::load(&src, &Device::Cpu, DType::F32).and_then(|m| m.into_model(false, &Device::Cpu, DType::F32))
    {
        Ok(_) => panic!("loading {id} should fail"),
        Err(e) => format!("{e:#}"),
    }
}

fn last_logits(model: &CausalLm) -> Vec<f32> {
    let ids = [1u32, 17, 300, 42, 7];
    let dev = Device::Cpu;
    let valid = vec![vec![true; ids.len()]];
    let input = Tensor::new(&ids, &dev).unwrap().unsqueeze(0).unwrap();
    let pos = Tensor::new(positions_from_mask(&valid), &dev).unwrap();
    let mask = attention_mask(&valid, ids.len(), None, &dev).unwrap();
    model.forward(&input, &pos, &mask, None).unwrap().get(0).unwrap().get(4).unwrap().to_vec1().unwrap()
}

fn tiny_llama() -> PathBuf {
    common::fixture("tiny/tiny-llama")
}

#[test]
fn source_is_decided_from_the_id() {
    let dir = tiny_llama();
    assert_eq!(ModelSource::parse(dir.to_str().unwrap(), None).unwrap(), ModelSource::Dir(dir.clone()));
    assert_eq!(
        ModelSource::parse("HuggingFaceTB/SmolLM2-135M-Instruct", Some("v1")).unwrap(),
        ModelSource::Hub { repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), revision: "v1".into() }
    );
    let e = ModelSource::parse("/nonexistent/model.gguf", None).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/model.gguf") && e.contains("does not exist"), "{e}");
    let e = ModelSource::parse("not-a-model", None).unwrap_err().to_string();
    assert!(e.contains("not-a-model") && e.contains("org/name"), "{e}");
    let file = dir.join("config.json");
    let e = ModelSource::parse(file.to_str().unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("not a .gguf"), "{e}");
}

#[test]
fn missing_config_json_names_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(tiny_llama().join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path().to_str().unwrap());
    assert!(e.contains("config.json") && e.contains(&tmp.path().display().to_string()), "{e}");
}

#[test]
fn truncated_safetensors_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&tiny_llama(), tmp.path());
    let f = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(tmp.path().to_str().unwrap());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn truncated_gguf_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("cut.gguf");
    let mut bytes = vec![0u8; 8 << 20];
    use std::io::Read;
    std::fs::File::open(common::smollm2_gguf()).unwrap().read_exact(&mut bytes).unwrap();
    std::fs::write(&f, &bytes).unwrap();
    let e = load_err(f.to_str().unwrap());
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    // Not a GGUF at all.
    std::fs::write(&f, b"hello").unwrap();
    let e = load_err(f.to_str().unwrap());
    assert!(e.contains("cut.gguf") && e.contains("GGUF"), "{e}");
}

#[test]
fn unsupported_architecture_lists_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&tiny_llama(), tmp.path());
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("LlamaForCausalLM", "GPT2LMHeadModel")
        .replace("\"llama\"", "\"gpt2\"");
    std::fs::write(&cfg, text).unwrap();
    let e = load_err(tmp.path().to_str().unwrap());
    assert!(e.contains("GPT2LMHeadModel") && e.contains("Qwen2ForCausalLM") && e.contains("config.json"), "{e}");
}

#[test]
fn rope_theta_is_read_from_both_layouts_and_conflicts_are_errors() {
    let base: serde_json::Value = common::read_json(&tiny_llama().join("config.json"));
    let parse = |v: &serde_json::Value| serde_json::from_value::<HfConfig>(v.clone()).unwrap().validate("config.json");
    // transformers 5 layout (the fixture): nested only.
    assert_eq!(parse(&base).unwrap().rope_theta, 10000.0);
    let mut old = base.clone();
    old.as_object_mut().unwrap().remove("rope_parameters");
    old["rope_theta"] = 500000.0.into();
    assert_eq!(parse(&old).unwrap().rope_theta, 500000.0);
    let mut both = base.clone();
    both["rope_theta"] = 20000.0.into();
    let e = format!("{:#}", parse(&both).unwrap_err());
    assert!(e.contains("rope_theta") && e.contains("disagrees"), "{e}");
    // Llama 3 scaling in the old layout.
    let mut l3 = old.clone();
    l3["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let cfg = parse(&l3).unwrap();
    assert!(matches!(cfg.rope_scaling, safe::model::config::RopeScaling::Llama3 { .. }));
    let mut yarn = old;
    yarn["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    let e = format!("{:#}", parse(&yarn).unwrap_err());
    assert!(e.contains("yarn") && e.contains("llama3"), "{e}");
}

#[test]
fn llama3_rope_scaling_matches_transformers_formula() {
    // transformers' _compute_llama3_parameters with theta 500000, d = 128, factor 8, low 1, high 4, old 8192:
    // wavelen < 8192/4 = 2048 → unchanged; wavelen > 8192 → divided by 8; in between → smooth interpolation.
    let v = serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 256,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
    let cfg = serde_json::from_value::<HfConfig>(v).unwrap().validate("x").unwrap();
    let f = cfg.rope_inv_freq();
    assert_eq!(f.len(), 64);
    assert_eq!(f[0], 1.0);
    let base = |i: usize| 1.0 / 500000f64.powf((2 * i) as f64 / 128.0);
    for (i, &got) in f.iter().enumerate() {
        let b = base(i);
        let wl = 2.0 * std::f64::consts::PI / b;
        let want = if wl < 2048.0 {
            b
        } else if wl > 8192.0 {
            b / 8.0
        } else {
            let s = (8192.0 / wl - 1.0) / 3.0;
            (1.0 - s) * b / 8.0 + s * b
        };
        assert!((got as f64 - want).abs() <= 1e-6 * want, "freq {i}: {got} vs {want}");
    }
}

#[test]
fn sharded_safetensors_load_like_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(tiny_llama().join(f), tmp.path().join(f)).unwrap();
    }
    let all = candle_core::safetensors::load(tiny_llama().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        let m: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), all[*n].clone())).collect();
        candle_core::safetensors::save(&m, tmp.path().join(shard)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = common::load_frozen(tmp.path().to_str().unwrap());
    let single = common::load_frozen(tiny_llama().to_str().unwrap());
    assert_eq!(last_logits(&sharded), last_logits(&single));
}

/// A hub cache laid out as huggingface_hub writes it: blobs, a ref, and a snapshot of links.
fn make_cache(root: &Path, repo: &str, commit: &str) {
    let repo_dir = root.join(format!("models--{}", repo.replace('/', "--")));
    let snap = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), commit).unwrap();
    for e in std::fs::read_dir(tiny_llama()).unwrap() {
        let e = e.unwrap();
        let blob = repo_dir.join("blobs").join(format!("blob-{}", e.file_name().to_string_lossy()));
        std::fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(e.file_name())).unwrap();
    }
}

#[test]
fn hub_id_resolves_through_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    make_cache(tmp.path(), "tiny-org/tiny-llama", commit);
    let snap = hub::resolve_in(tmp.path(), true, "tiny-org/tiny-llama", "main").unwrap();
    assert!(snap.ends_with(commit));
    // A revision given as a commit hash needs no ref.
    assert_eq!(hub::resolve_in(tmp.path(), true, "tiny-org/tiny-llama", commit).unwrap(), snap);
    let from_hub = common::load_frozen(snap.to_str().unwrap());
    let from_dir = common::load_frozen(tiny_llama().to_str().unwrap());
    assert_eq!(last_logits(&from_hub), last_logits(&from_dir));
    // Not cached, offline: a clear error naming the repo, the cache and the setting; no network touched.
    let e = format!("{:#}", hub::resolve_in(tmp.path(), true, "tiny-org/absent", "main").unwrap_err());
    assert!(
        e.contains("tiny-org/absent") && e.contains("HF_HUB_OFFLINE") && e.contains(&tmp.path().display().to_string()),
        "{e}"
    );
    let e = format!("{:#}", hub::resolve_in(tmp.path(), true, "tiny-org/tiny-llama", "v2").unwrap_err());
    assert!(e.contains("tiny-llama@v2"), "{e}");
}
