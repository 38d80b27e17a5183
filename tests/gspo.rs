//! GSPO (GRPO with `algorithm.importance_sampling_level = "sequence"` or `"sequence_token"`) end to end on the
//! built-in tiny model: five steps with μ = 2 (so the ratio moves off 1) and GSPO's clip range train, and three
//! steps + resume + two equal five, bit for bit.

mod common;

use common::train::*;

fn trains_and_resumes_exactly(level: &str) {
    let dir = tempfile::tempdir().unwrap();
    let body = TINY
        .replace(
            "[algorithm]\n",
            &format!(
                "[algorithm]\nimportance_sampling_level = \"{level}\"\nloss_type = \"grpo\"\nepsilon = 3e-4\n\
                 epsilon_high = 4e-4\n"
            ),
        )
        .replace("max_steps = 6", "max_steps = 5");
    let recipe = setup(dir.path(), &body, 5);
    ok(&train(&recipe, &["run.name=straight"], "never"));
    ok(&train(&recipe, &["run.name=split", "run.max_steps=3"], "never"));
    ok(&train(&recipe, &["run.name=split"], "auto"));
    let (a, b) = (dir.path().join("runs/straight"), dir.path().join("runs/split"));
    assert_eq!(checkpoint_bytes(&step_dir(&a, 5)), checkpoint_bytes(&step_dir(&b, 5)));
    assert_eq!(metrics(&a), metrics(&b));
    let text = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    // With a clip range of 4e-4 and a second update per step, some ratios leave it.
    let clipped: f64 = lines.iter().map(|m| m["clip_ratio/region_mean"].as_f64().unwrap()).sum();
    assert!(clipped > 0.0, "{level}: no sequence was ever clipped");
    for m in &lines {
        assert!(m["loss"].as_f64().is_some_and(f64::is_finite), "{m}");
    }
}

#[test]
fn gspo_sequence_level_trains_five_steps_and_resumes_exactly() {
    trains_and_resumes_exactly("sequence");
}

#[test]
fn gspo_token_trains_five_steps_and_resumes_exactly() {
    trains_and_resumes_exactly("sequence_token");
}
