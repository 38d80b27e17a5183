//! The memory plan refuses a step that cannot fit before any weights load (issue 13, finding 2):
//! `rollout.num_generations = 1000000000` once printed a 12 GB plan, then aborted on a 448 GB allocation with a
//! backtrace (exit 134). Now the plan counts every completion's bookkeeping and refuses it, exit 2, naming the keys.

mod common;

use std::time::{Duration, Instant};

use common::train::*;

#[test]
fn huge_num_generations_is_refused_quickly_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    let start = Instant::now();
    let out = train(&recipe, &["rollout.num_generations=1000000000"], "never");
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("rollout.num_generations") && e.contains("rollout.prompts_per_step"), "{e}");
    assert!(!e.contains("backtrace") && !e.contains("panicked"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    // Refused before the run directory is made: nothing was loaded or written.
    assert!(!dir.path().join("runs/t/metrics.jsonl").exists());
}

#[test]
fn the_startup_line_states_the_rollout_batch_and_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    let out = train(&recipe, &["run.max_steps=1", "rollout.batch_size=3"], "never");
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("memory:")).unwrap_or_else(|| panic!("no memory line: {stdout}"));
    assert!(line.contains("rollout batches of 3 sequences") && line.contains("update micro-batches of 4"), "{line}");
}
