//! `<run dir>/status.json`: what a run is doing or how it ended, for `safe runs`, `safe report` and scripts.
//!
//! `safe train` writes `running` once the trainer is built, then `done`, `failed` (exit 1) or `interrupted`
//! (exit 130) from the result of the run, each time atomically (a temporary file renamed over the old one). A
//! reader never trusts `running` alone: a run whose process died without finishing (`kill -9`, a power cut) leaves
//! `running` behind, so [`observe`] checks the run's lock (`<output_dir>/<name>.lock`, held by the training process
//! for as long as it lives) and reports such a run as `killed`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::exit::{self, Failure};

pub const STATUS_FILE: &str = "status.json";

/// What `safe train` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recorded {
    Running,
    Done,
    Failed,
    Interrupted,
}

/// The content of `status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub status: Recorded,
    /// The last finished step (the starting step while `running`).
    pub step: u64,
    pub max_steps: u64,
    /// The error for `failed` and `interrupted`; empty otherwise.
    #[serde(default)]
    pub message: String,
    pub pid: u32,
    /// Unix seconds: when this process started training, and when the file was last written.
    pub started: u64,
    pub updated: u64,
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Status {
    /// A `running` status of this process, started now.
    pub fn running(step: u64, max_steps: u64) -> Self {
        let t = now();
        Self {
            status: Recorded::Running,
            step,
            max_steps,
            message: String::new(),
            pid: std::process::id(),
            started: t,
            updated: t,
        }
    }

    /// The status after the run ended with `result` at `step`: done, failed (exit 1) or interrupted (exit 130).
    pub fn finished(&self, result: &Result<(), Failure>, step: u64) -> Self {
        let (status, message) = match result {
            Ok(()) => (Recorded::Done, String::new()),
            Err(f) if f.code == exit::INTERRUPTED => (Recorded::Interrupted, f.message()),
            Err(f) => (Recorded::Failed, f.message()),
        };
        Self { status, step, message, updated: now(), ..self.clone() }
    }

    /// Write `<run_dir>/status.json` atomically (temporary file, then rename).
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let path = run_dir.join(STATUS_FILE);
        let tmp = run_dir.join(format!(".{STATUS_FILE}.tmp"));
        let mut text = serde_json::to_string_pretty(self).expect("a status serialises");
        text.push('\n');
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(())
    }

    /// Read `<run_dir>/status.json`; `None` when there is none (a run from before status files).
    pub fn read(run_dir: &Path) -> Result<Option<Self>> {
        let path = run_dir.join(STATUS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        serde_json::from_str(&text).map(Some).with_context(|| format!("{} is not a run status", path.display()))
    }
}

/// What a reader reports: the recorded status, checked against the run's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Done,
    Failed,
    Interrupted,
    /// `running` was recorded but no process holds the run's lock: it died without finishing.
    Killed,
    /// No `status.json` (a run from an older `safe`), or one that cannot be read.
    Unknown,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
            Self::Killed => "killed",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A run's state and its recorded status (when there is a readable one).
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub state: RunState,
    pub status: Option<Status>,
}

/// The lock file of the run in `run_dir`: `<output_dir>/<name>.lock`, beside the directory
/// ([`super::run_dir::RunLock`] holds it while training).
pub fn lock_file(run_dir: &Path) -> Option<PathBuf> {
    let dir = std::path::absolute(run_dir).ok()?;
    let dir = normalise(&dir);
    let name = dir.file_name()?.to_str()?;
    Some(super::run_dir::lock_path(dir.parent()?, name))
}

/// `a/./b/../c` → `a/c` without touching the file system (a run directory given as `runs/x/.` still names `x`).
pub fn normalise(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Whether some process holds the lock file `path` (a shared, non-blocking `flock`, released at once). A missing
/// file is not held.
pub fn lock_is_held(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(path) else { return false };
    // SAFETY: a valid open descriptor; flock has no memory effects.
    let got = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    if got {
        // SAFETY: as above. Closing the file would release it too; unlock explicitly to say so.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    }
    !got
}

/// The state of the run in `run_dir`.
pub fn observe(run_dir: &Path) -> Observed {
    let Ok(Some(status)) = Status::read(run_dir) else { return Observed { state: RunState::Unknown, status: None } };
    let state = match status.status {
        Recorded::Running => {
            if lock_file(run_dir).is_some_and(|p| lock_is_held(&p)) {
                RunState::Running
            } else {
                RunState::Killed
            }
        }
        Recorded::Done => RunState::Done,
        Recorded::Failed => RunState::Failed,
        Recorded::Interrupted => RunState::Interrupted,
    };
    Observed { state, status: Some(status) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> crate::recipe::RunSettings {
        let text = format!("[run]\nname = \"r\"\noutput_dir = {:?}\n[model]\nid = \"builtin:tiny\"\n[data]\nsource = \"builtin:arithmetic\"\n[[reward]]\nname = \"correct\"\nrule = \"exact_answer\"\n", dir.display().to_string());
        crate::recipe::from_str(&text, "test", &[]).unwrap().run
    }

    #[test]
    fn written_status_reads_back_and_the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = Status::running(4, 10);
        s.write(dir.path()).unwrap();
        assert_eq!(Status::read(dir.path()).unwrap(), Some(s.clone()));
        let done = s.finished(&Ok(()), 10);
        done.write(dir.path()).unwrap();
        let back = Status::read(dir.path()).unwrap().unwrap();
        assert_eq!((back.status, back.step, back.started, back.pid), (Recorded::Done, 10, s.started, s.pid));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [STATUS_FILE], "no temporary file left behind");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(STATUS_FILE)).unwrap()).unwrap();
        for key in ["status", "step", "max_steps", "message", "pid", "started", "updated"] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        assert_eq!(v["status"], "done");
    }

    #[test]
    fn failures_and_interruptions_record_the_message() {
        let s = Status::running(0, 5);
        let failed = s.finished(&Err(Failure::training(anyhow::anyhow!("loss is NaN"))), 3);
        assert_eq!((failed.status, failed.step, failed.message.as_str()), (Recorded::Failed, 3, "loss is NaN"));
        let stopped = s.finished(&Err(Failure::interrupted(anyhow::anyhow!("interrupted at step 2"))), 2);
        assert_eq!(stopped.status, Recorded::Interrupted);
        assert_eq!(stopped.message, "interrupted at step 2");
    }

    #[test]
    fn running_is_killed_unless_the_lock_is_held() {
        let out = tempfile::tempdir().unwrap();
        let run = settings(out.path());
        let run_dir = run.dir();
        std::fs::create_dir_all(&run_dir).unwrap();
        Status::running(0, 5).write(&run_dir).unwrap();
        // No lock file at all: nobody is training it.
        assert_eq!(observe(&run_dir).state, RunState::Killed);
        {
            let _lock = crate::train::run_dir::RunLock::acquire(&run).unwrap();
            assert_eq!(lock_file(&run_dir), Some(crate::train::run_dir::RunLock::path(&run)));
            assert_eq!(observe(&run_dir).state, RunState::Running);
            // The check takes and releases a shared lock only when free: the holder keeps its lock.
            assert_eq!(observe(&run_dir.join(".")).state, RunState::Running);
            assert!(crate::train::run_dir::RunLock::acquire(&run).is_err());
        }
        // The lock file is left behind, but free.
        assert!(crate::train::run_dir::RunLock::path(&run).exists());
        assert_eq!(observe(&run_dir).state, RunState::Killed);
        // Observing released its shared lock: training can take the run again.
        drop(crate::train::run_dir::RunLock::acquire(&run).unwrap());
    }

    #[test]
    fn finished_states_and_missing_or_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(observe(dir.path()), Observed { state: RunState::Unknown, status: None });
        std::fs::write(dir.path().join(STATUS_FILE), "{not json").unwrap();
        assert_eq!(observe(dir.path()).state, RunState::Unknown);
        assert!(Status::read(dir.path()).is_err());
        let s = Status::running(0, 5);
        for (result, state) in [
            (Ok(()), RunState::Done),
            (Err(Failure::training(anyhow::anyhow!("x"))), RunState::Failed),
            (Err(Failure::interrupted(anyhow::anyhow!("x"))), RunState::Interrupted),
        ] {
            s.finished(&result, 5).write(dir.path()).unwrap();
            assert_eq!(observe(dir.path()).state, state);
        }
    }
}
