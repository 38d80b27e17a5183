//! One process per run directory (issue 13): a second `safe train` on a live run once deleted its temporary
//! checkpoint or moved its checkpoints aside, and `--resume never --overwrite` deleted a live run. Now the run's
//! lock refuses both (exit 2, naming the holder's PID), and a killed holder leaves no stale lock.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::train::*;

#[test]
fn a_second_process_on_a_live_run_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = setup(dir.path(), TINY, 5);
    let mut holder = safe_cmd()
        .args(["train", "--config", recipe.to_str().unwrap(), "--resume", "never"])
        .args(["--set", "run.max_steps=1000000", "--set", "run.save_every=0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = dir.path().join("runs/t.lock");
    let pid = holder.id().to_string();
    let start = Instant::now();
    while std::fs::read_to_string(&lock).ok().as_deref() != Some(pid.as_str()) {
        assert!(start.elapsed() < Duration::from_secs(60), "the first run never took its lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The lock comes before the model loads; wait until the run logs a step, so the checks below see a live run
    // with a metrics file to lose (on a slow machine the file did not exist yet when they ran).
    let metrics = dir.path().join("runs/t/metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().next().is_none()) {
        assert!(start.elapsed() < Duration::from_secs(120), "the first run never logged a step");
        assert!(holder.try_wait().unwrap().is_none(), "the first run exited before logging a step");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = |extra: &[&str]| {
        let mut c = safe_cmd();
        c.args(["train", "--config", recipe.to_str().unwrap()]).args(extra);
        c.output().unwrap()
    };
    let expected = format!("is in use by process {pid}");
    for extra in [&["--resume", "auto"][..], &["--resume", "never", "--overwrite"], &["--resume", "never"]] {
        let out = second(extra);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(&expected), "{extra:?}: {}", stderr(&out));
    }
    assert!(metrics.is_file(), "the live run was left alone");
    assert!(holder.try_wait().unwrap().is_none(), "the live run kept running");
    // kill -9: the kernel drops the lock with the process; the next run takes it at once.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let out = second(&["--resume", "never", "--overwrite", "--set", "run.max_steps=1"]);
    ok(&out);
    assert!(std::fs::read_to_string(&lock).unwrap().trim().parse::<u32>().is_ok());
}
