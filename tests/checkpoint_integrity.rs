//! Checkpoints you can trust (issue 13, finding 6): a damaged checkpoint is found on resume by its recorded
//! SHA-256 (or its safetensors length) and passed over with a warning naming what is wrong; a run whose checkpoints
//! are all damaged is refused (exit 2), never silently restarted from step 0; `--resume auto` takes the newest
//! complete checkpoint whatever `latest` says; superseded checkpoints count toward `run.keep_last`.

mod common;

use std::path::Path;

use common::train::*;

/// A finished 6-step TINY run (checkpoints at steps 3 and 6) in `dir`; returns the recipe and the run directory.
fn finished_run(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let recipe = setup(dir, TINY, 5);
    ok(&train(&recipe, &[], "never"));
    (recipe, dir.join("runs/t"))
}

fn names(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Damage step 6 with `damage`, resume with `--resume auto`: the run falls back to step 3 with a warning containing
/// `why`, and re-trains steps 4-6 to exactly the uninterrupted run's step-6 checkpoint.
fn falls_back_from_a_damaged_newest(damage: impl Fn(&Path), why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, run) = finished_run(dir.path());
    let before = checkpoint_bytes(&step_dir(&run, 6));
    damage(&step_dir(&run, 6));
    let out = train(&recipe, &["run.max_steps=6"], "auto");
    ok(&out);
    let err = stderr(&out);
    assert!(err.contains("warning: checkpoint") && err.contains("step-6"), "{err}");
    assert!(err.contains(why), "expected {why:?} in:\n{err}");
    assert!(err.contains("resuming from the older") && err.contains("step-3"), "{err}");
    assert_eq!(checkpoint_bytes(&step_dir(&run, 6)), before, "re-trained steps equal the uninterrupted run");
    // The damaged one is kept aside for inspection, never rotated out.
    assert!(err.contains("damaged-step-6"), "{err}");
    assert_eq!(names(&run), ["damaged-step-6", "latest", "step-3", "step-6"]);
}

#[test]
fn corrupt_newest_state_json_falls_back_with_a_warning_naming_it() {
    falls_back_from_a_damaged_newest(
        |d| std::fs::write(d.join("state.json"), "{ \"format\": 1, ").unwrap(),
        "state.json is corrupt",
    );
}

#[test]
fn truncated_model_safetensors_falls_back_to_the_previous_checkpoint() {
    falls_back_from_a_damaged_newest(
        |d| {
            let p = d.join("model.safetensors");
            let len = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len / 2).unwrap();
        },
        "model.safetensors is truncated",
    );
}

#[test]
fn a_changed_byte_fails_the_recorded_sha256_and_falls_back() {
    falls_back_from_a_damaged_newest(
        |d| {
            // Same length, one bit of the last weight flipped: only the digest can tell.
            let p = d.join("optimizer.safetensors");
            let mut bytes = std::fs::read(&p).unwrap();
            *bytes.last_mut().unwrap() ^= 1;
            std::fs::write(&p, bytes).unwrap();
        },
        "optimizer.safetensors does not match the SHA-256 recorded in state.json",
    );
}

#[test]
fn an_edited_state_json_fails_its_own_digest_and_falls_back() {
    // The data position is in state.json, not in a tensor file: an edit must not be trained on.
    falls_back_from_a_damaged_newest(
        |d| {
            let p = d.join("state.json");
            let text = std::fs::read_to_string(&p).unwrap().replace("\"cursor\": ", "\"cursor\": 1");
            std::fs::write(&p, text).unwrap();
        },
        "state.json does not match its own SHA-256",
    );
}

#[test]
fn damaged_checkpoints_passed_over_are_never_rotated_out() {
    // Regression: the passed-over checkpoints were moved aside as superseded, and superseded ones are rotated out
    // first, so a file missing mid-copy cost the newer checkpoints for good.
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &TINY.replace("save_every = 3", "save_every = 1\nkeep_last = 3"), 5);
    ok(&train(&recipe, &[], "never"));
    let run = dir.path().join("runs/t");
    for step in [5, 6] {
        std::fs::remove_file(step_dir(&run, step).join("optimizer.safetensors")).unwrap();
    }
    ok(&train(&recipe, &["run.max_steps=6"], "auto"));
    assert_eq!(names(&run), ["damaged-step-5", "damaged-step-6", "latest", "step-4", "step-5", "step-6"]);
}

#[test]
fn corrupt_state_json_in_every_checkpoint_is_exit_2_not_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, run) = finished_run(dir.path());
    for step in [3, 6] {
        std::fs::write(step_dir(&run, step).join("state.json"), "garbage").unwrap();
    }
    let metrics_before = metrics(&run);
    let out = train(&recipe, &["run.max_steps=9"], "auto");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("no intact checkpoint"), "{err}");
    assert!(err.contains("step-3/state.json is corrupt") && err.contains("step-6/state.json is corrupt"), "{err}");
    assert!(err.contains("--resume never --overwrite"), "{err}");
    // Nothing was trained or moved.
    assert_eq!(metrics(&run), metrics_before);
    assert_eq!(names(&run), ["latest", "step-3", "step-6"]);
}

#[test]
fn resume_auto_takes_the_newest_complete_checkpoint_not_latest() {
    let dir = tempfile::tempdir().unwrap();
    let (recipe, run) = finished_run(dir.path());
    std::fs::write(run.join("checkpoints/latest"), "step-3\n").unwrap();
    let out = train(&recipe, &["run.max_steps=7"], "auto");
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("step-6 (step 6)"), "{stdout}");
    assert_eq!(metrics(&run).len(), 7);
}

#[test]
fn superseded_checkpoints_count_toward_keep_last() {
    // Saved every step, 3 kept: steps 4-6. Resuming from step 4 moves 5 and 6 aside; re-saving 5 and 6 must rotate
    // the superseded ones out instead of letting them pile up.
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), &TINY.replace("save_every = 3", "save_every = 1\nkeep_last = 3"), 5);
    ok(&train(&recipe, &[], "never"));
    let run = dir.path().join("runs/t");
    assert_eq!(names(&run), ["latest", "step-4", "step-5", "step-6"]);
    let out = train(&recipe, &[], step_dir(&run, 4).to_str().unwrap());
    ok(&out);
    assert_eq!(names(&run), ["latest", "step-4", "step-5", "step-6"]);
}
