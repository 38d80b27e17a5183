//! `run.report_to = ["tensorboard"]`: event files under `<run dir>/tb/`, read back with TensorBoard's own reader
//! (`EventAccumulator`, through scripts/read-tensorboard.py) and compared with metrics.jsonl value for value, after a
//! fresh run and after resumes that truncate metrics.jsonl.
//!
//! The reader is the PyPI package `tensorboard`: scripts/test.sh installs a pinned one (scripts/fetch-tensorboard.sh)
//! and sets `SAFE_TB_PYTHONPATH` to it, and `SAFE_REQUIRE_TENSORBOARD=1` so that a missing reader fails. Under a
//! plain `cargo test` without the package, the reader tests say so on stderr and pass without checking.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::train::*;

const TB: &str = "run.report_to=[\"jsonl\", \"tensorboard\"]";
const JSONL_ONLY: &str = "run.report_to=[\"jsonl\"]";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `python3` with TensorBoard importable (through `SAFE_TB_PYTHONPATH`).
struct Reader {
    python_path: Option<String>,
}

impl Reader {
    fn python(&self) -> Command {
        let mut c = Command::new("python3");
        if let Some(p) = &self.python_path {
            c.env("PYTHONPATH", p);
        }
        c
    }
}

/// The reader, or `None` (after saying why on stderr) when it does not import and `SAFE_REQUIRE_TENSORBOARD` is not 1.
fn reader() -> Option<Reader> {
    let reader = Reader { python_path: std::env::var("SAFE_TB_PYTHONPATH").ok() };
    let probe =
        reader.python().args(["-c", "from tensorboard.backend.event_processing import event_accumulator"]).output();
    let why = match &probe {
        Ok(o) if o.status.success() => return Some(reader),
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("").to_string(),
        Err(e) => format!("python3: {e}"),
    };
    if std::env::var("SAFE_REQUIRE_TENSORBOARD").is_ok_and(|v| v == "1") {
        panic!(
            "SAFE_REQUIRE_TENSORBOARD=1 but TensorBoard's reader does not import (SAFE_TB_PYTHONPATH = {:?}): {why}; \
             run `bash scripts/fetch-tensorboard.sh`",
            reader.python_path
        );
    }
    eprintln!(
        "SKIPPED: TensorBoard's reader is not installed ({why}); `bash scripts/test.sh` installs it (or set \
         SAFE_TB_PYTHONPATH=\"$(bash scripts/fetch-tensorboard.sh)\")"
    );
    None
}

/// What TensorBoard reads from a run's tb/: event file names, file version, and tag → [(step, value)].
struct Read {
    files: Vec<String>,
    file_version: f64,
    scalars: BTreeMap<String, Vec<(u64, f32)>>,
}

fn read_tb(reader: &Reader, dir: &Path) -> Read {
    let out = reader.python().arg(repo().join("scripts/read-tensorboard.py")).arg(dir).output().unwrap();
    assert!(out.status.success(), "read-tensorboard.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = v["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    let scalars = v["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, events)| {
            let events = events
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap() as f32))
                .collect();
            (tag.clone(), events)
        })
        .collect();
    Read { files, file_version: v["file_version"].as_f64().unwrap_or(0.0), scalars }
}

/// metrics.jsonl as TensorBoard should show it: tag → [(step, value as f32)] in line order, nulls left out.
fn expected(run: &Path) -> BTreeMap<String, Vec<(u64, f32)>> {
    let mut out: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines() {
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        for (name, value) in v.iter().filter(|(n, _)| *n != "step") {
            if let Some(x) = value.as_f64() {
                out.entry(name.clone()).or_default().push((step, x as f32));
            }
        }
    }
    out
}

/// TensorBoard's view of tb/ equals metrics.jsonl: same tags, and for each the same (step, f32 value) sequence.
fn assert_same(reader: &Reader, run: &Path, steps: u64) {
    let read = read_tb(reader, &run.join("tb"));
    assert_eq!(read.files.len(), 1, "one event file: {:?}", read.files);
    let name = &read.files[0];
    let parts: Vec<&str> = name.strip_prefix("events.out.tfevents.").unwrap().split('.').collect();
    assert!(parts.len() >= 4 && parts[0].len() == 10 && parts[0].parse::<u64>().is_ok(), "{name}");
    assert!(parts[parts.len() - 2].parse::<u32>().is_ok() && parts[parts.len() - 1].parse::<u32>().is_ok(), "{name}");
    assert_eq!(read.file_version, 2.0);
    let want = expected(run);
    assert_eq!(want["reward"].len() as u64, steps);
    assert!(want.contains_key("rewards/correct/mean") && want.contains_key("timing/step"));
    assert_eq!(read.scalars.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "tags");
    for (tag, events) in &want {
        // f32 equality by bits: the reader holds exactly the f32 we wrote.
        let bits = |e: &[(u64, f32)]| e.iter().map(|(s, v)| (*s, v.to_bits())).collect::<Vec<_>>();
        assert_eq!(
            bits(&read.scalars[tag]),
            bits(events),
            "tag {tag}: reader {:?}, metrics.jsonl {events:?}",
            read.scalars[tag]
        );
    }
}

fn run_dir(dir: &Path) -> PathBuf {
    dir.join("runs/quickstart")
}

/// The quickstart recipe, short and in its own directory.
fn quickstart(dir: &Path, sets: &[&str], resume: &str) {
    let config = repo().join("configs/quickstart.toml");
    let output_dir = format!("run.output_dir={}", dir.join("runs").display());
    // Every step logged, and no held-out split unless a test names its own evaluation.
    let mut all = vec![
        output_dir.as_str(),
        "rollout.prompts_per_step=2",
        "rollout.num_generations=4",
        "run.log_every=1",
        "eval.split=0.0",
    ];
    all.extend_from_slice(sets);
    ok(&train(&config, &all, resume));
}

#[test]
fn tensorboard_reads_what_metrics_jsonl_holds() {
    let Some(reader) = reader() else { return };
    let dir = tempfile::tempdir().unwrap();
    // With evaluation too: its `eval/*` metrics (step 0 included, before the first step) are scalars like the rest.
    let eval = ["eval.source=builtin:arithmetic", "eval.max_prompts=4", "eval.every=2"];
    quickstart(dir.path(), &[&[TB, "run.max_steps=4", "run.save_every=2"][..], &eval].concat(), "never");
    let run = run_dir(dir.path());
    assert_same(&reader, &run, 4);
    let evals: Vec<u64> = expected(&run)["eval/reward"].iter().map(|(s, _)| *s).collect();
    assert_eq!(evals, [0, 2, 4]);
}

#[test]
fn resumes_rebuild_tb_from_the_truncated_metrics() {
    let reader = reader();
    let dir = tempfile::tempdir().unwrap();
    let run = run_dir(dir.path());
    let ckpt = |s: u64| run.join("checkpoints").join(format!("step-{s}")).display().to_string();
    // Without TensorBoard: no tb/.
    quickstart(dir.path(), &[JSONL_ONLY, "run.max_steps=4", "run.save_every=2"], "never");
    assert!(!run.join("tb").exists());
    // Resumed from step 2 with TensorBoard on (report_to may change on resume): steps 1-2 replayed from the
    // truncated metrics.jsonl, 3-5 written as they train.
    quickstart(dir.path(), &[TB, "run.max_steps=5", "run.save_every=2"], &ckpt(2));
    assert_eq!(expected(&run)["reward"].len(), 5);
    if let Some(reader) = &reader {
        assert_same(reader, &run, 5);
    }
    // Resumed from step 4: the first file's step 5 is gone (its timing/* differ from the new step 5's, so a stale
    // event would show), one new file holds steps 1-4 replayed and 5-6 trained.
    quickstart(dir.path(), &[TB, "run.max_steps=6", "run.save_every=2"], &ckpt(4));
    if let Some(reader) = &reader {
        assert_same(reader, &run, 6);
    }
    // Resumed with TensorBoard off: the event files (which would go stale) are removed, other files kept.
    std::fs::write(run.join("tb/notes.txt"), "mine").unwrap();
    quickstart(dir.path(), &[JSONL_ONLY, "run.max_steps=7"], "auto");
    let left: Vec<_> = std::fs::read_dir(run.join("tb")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["notes.txt"]);
}
