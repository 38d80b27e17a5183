//! `model.reference`: a separate frozen reference (TRL `ref_model`, OpenRLHF `--ref_pretrain`). The default is the
//! starting policy (the first step's KL is exactly 0); another model gives a KL from the first step; one with
//! another architecture or vocabulary is refused, naming both.

mod common;

use common::train::*;

fn kl_of_first_step(run: &std::path::Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    first["kl"].as_f64().unwrap()
}

#[test]
fn a_separate_reference_model_is_used_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    // μ = 1 so the first update is on-policy: with the starting policy as reference, KL = 0 exactly.
    ok(&train(&recipe, &["run.name=base", "run.max_steps=2", "algorithm.num_iterations=1"], "never"));
    let base = dir.path().join("runs/base");
    assert_eq!(kl_of_first_step(&base), 0.0);
    // A trained checkpoint (an HF directory) as the reference: the fresh policy differs from it at step 1.
    let reference = step_dir(&base, 2);
    let set = format!("model.reference={}", reference.display());
    ok(&train(&recipe, &["run.name=other", "run.max_steps=1", "algorithm.num_iterations=1", &set], "never"));
    let kl = kl_of_first_step(&dir.path().join("runs/other"));
    assert!(kl > 0.0, "KL to a different reference: {kl}");
    // Another vocabulary (SmolLM2-360M's shape, 49152 tokens) or architecture (a Qwen2 fixture) is refused.
    let out = train(&recipe, &["run.name=bad", "model.reference=builtin:random-360m"], "never");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("model.reference = builtin:random-360m") && err.contains("49152"), "{err}");
    let qwen = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reward-model/tiny-qwen2-rm");
    let out = train(&recipe, &["run.name=bad2", &format!("model.reference={}", qwen.display())], "never");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Qwen2") && stderr(&out).contains("Llama"), "{}", stderr(&out));
}
