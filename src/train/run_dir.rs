//! The run directory `<output_dir>/<name>/` and where a run starts: fresh, or from a checkpoint (`--resume`).
//!
//! Layout: `recipe.resolved.toml`, `metrics.jsonl`, `tb/` (TensorBoard, with `run.report_to`),
//! `completions/step-<N>.jsonl`, `checkpoints/step-<N>/`.
//! Every decision about an existing run directory is made here, before anything is loaded, so a wrong `--resume`
//! costs nothing and never deletes a checkpoint by accident.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::checkpoint::{self, Checkpoint, SUPERSEDED_PREFIX};
use crate::recipe::{self, Recipe, RESUMABLE_KEYS};

pub const RESOLVED_RECIPE_FILE: &str = "recipe.resolved.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const COMPLETIONS_DIR: &str = "completions";
/// TensorBoard event files, a copy of `metrics.jsonl` (rebuilt from it when the metrics writer opens).
pub const TENSORBOARD_DIR: &str = "tb";

/// `--resume auto|DIR|never`.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    Auto,
    Never,
    Dir(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "never" => Self::Never,
            "" => return Err("expected auto, never or a checkpoint directory".into()),
            dir => Self::Dir(PathBuf::from(dir)),
        })
    }
}

/// Where the run starts.
pub enum Start {
    Fresh,
    From(Checkpoint),
}

/// An exclusive advisory lock (`flock`) on `<output_dir>/<name>.lock`, beside the run directory (so `--overwrite`
/// never deletes it), held for the whole process. The kernel releases it when the process ends however it ends, so
/// a killed run never leaves a stale lock; the file keeps the holder's PID for the message.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// The lock file of a run.
    pub fn path(run: &recipe::RunSettings) -> PathBuf {
        lock_path(&run.output_dir, &run.name)
    }

    /// Take the run's lock, or fail (exit 2) naming the process that holds it.
    pub fn acquire(run: &recipe::RunSettings) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = Self::path(run);
        std::fs::create_dir_all(&run.output_dir)
            .with_context(|| format!("cannot create the output directory {}", run.output_dir.display()))?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the run's lock file {}", path.display()))?;
        // SAFETY: a valid open descriptor; flock has no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
            bail!(
                "run {} is in use by {who} (it holds {}): wait for it to finish, stop it, or pick another run.name",
                run.dir().display(),
                path.display()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(Self { _file: file })
    }
}

/// The lock file of run `name` in `output_dir`: `<output_dir>/<name>.lock`.
pub fn lock_path(output_dir: &Path, name: &str) -> PathBuf {
    output_dir.join(format!("{name}.lock"))
}

/// `completions/step-<N>.jsonl`.
pub fn completions_file(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(COMPLETIONS_DIR).join(format!("step-{step}.jsonl"))
}

/// `completions/eval-step-<N>.jsonl`: the held-out evaluation after step N (0: before the first step).
pub fn eval_completions_file(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(COMPLETIONS_DIR).join(format!("eval-step-{step}.jsonl"))
}

/// Decide where the run starts. Errors are bad input (exit 2): nothing has been written yet.
///
/// - `auto`: the newest intact checkpoint of this run (a warning for each newer one passed over, naming what is
///   wrong with it), else a fresh start (a run killed before its first checkpoint restarts from step 0); a run whose
///   checkpoints are all damaged is refused, never silently started over;
/// - `never`: a fresh start; an existing non-empty run directory is refused unless `overwrite`, which deletes it;
/// - `DIR`: that checkpoint (of this run or another one).
///
/// A checkpoint whose recipe differs from `recipe` in a key that may not change on resume is refused, naming the keys.
/// Returns the start and warnings for the console.
pub fn resolve_start(recipe: &Recipe, resume: &Resume, overwrite: bool) -> Result<(Start, Vec<String>)> {
    let run_dir = recipe.run.dir();
    if overwrite && *resume != Resume::Never {
        bail!("--overwrite starts the run over: use it with --resume never");
    }
    let mut warnings = Vec::new();
    let start = match resume {
        Resume::Never => {
            if is_non_empty_dir(&run_dir) {
                if !overwrite {
                    bail!(
                        "run directory {} already exists and is not empty: continue it with --resume auto, start it \
                         over with --resume never --overwrite (deletes it), or pick another run.name",
                        run_dir.display()
                    );
                }
                std::fs::remove_dir_all(&run_dir)
                    .with_context(|| format!("cannot remove {} (--overwrite)", run_dir.display()))?;
            }
            Start::Fresh
        }
        Resume::Auto => match checkpoint::newest_intact(&run_dir)? {
            Some(found) => {
                for (dir, why) in found.passed_over {
                    let aside = checkpoint::set_aside_damaged(&dir)?;
                    warnings.push(format!(
                        "checkpoint {} is not usable: {why}; resuming from the older {} instead. It is kept as {} \
                         (never rotated out: delete it when you no longer need it)",
                        dir.display(),
                        found.checkpoint.dir().display(),
                        aside.display()
                    ));
                }
                Start::From(found.checkpoint)
            }
            None => Start::Fresh,
        },
        Resume::Dir(dir) => Start::From(
            Checkpoint::open(dir).with_context(|| format!("--resume {}: not a usable checkpoint", dir.display()))?,
        ),
    };
    if let Start::From(ckpt) = &start {
        check_recipe(ckpt, recipe)?;
    }
    Ok((start, warnings))
}

/// The recipe a checkpoint was trained under must equal this one except for [`RESUMABLE_KEYS`].
fn check_recipe(ckpt: &Checkpoint, recipe: &Recipe) -> Result<()> {
    let state = ckpt.state();
    let origin = format!("{} (recipe of the checkpoint)", ckpt.dir().join(checkpoint::STATE_FILE).display());
    let text = state
        .get("recipe")
        .and_then(|v| v.as_str())
        .with_context(|| format!("{origin}: no `recipe` in the training state"))?;
    let saved = recipe::from_str(text, &origin, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let conflicts = saved.resume_conflicts(recipe);
    if !conflicts.is_empty() {
        let changed: Vec<String> = conflicts.iter().map(|k| format!("`{k}`")).collect();
        bail!(
            "cannot resume from {}: the recipe changed {} since that checkpoint; only {} may change on resume. \
             Restore those keys, start a new run (another run.name), or start over with --resume never --overwrite",
            ckpt.dir().display(),
            changed.join(", "),
            RESUMABLE_KEYS.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

fn is_non_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).map(|mut d| d.next().is_some()).unwrap_or(false)
}

/// Make the run directory ready for a run starting after `step` (0 = fresh): create it, write the resolved recipe,
/// drop metrics lines after `step` (and, without TensorBoard output, the event files that would still show them), and
/// move this run's checkpoints after `step` aside (`superseded-step-<N>`), so discovery and rotation only see the line
/// of history being continued. Returns the names moved aside.
pub fn prepare(recipe: &Recipe, step: u64) -> Result<Vec<String>> {
    let run_dir = recipe.run.dir();
    std::fs::create_dir_all(run_dir.join(COMPLETIONS_DIR))
        .with_context(|| format!("cannot create the run directory {}", run_dir.display()))?;
    let resolved = run_dir.join(RESOLVED_RECIPE_FILE);
    std::fs::write(&resolved, recipe.to_toml_string())
        .with_context(|| format!("cannot write {}", resolved.display()))?;
    let metrics = run_dir.join(METRICS_FILE);
    if step == 0 {
        // A fresh start logs its own step 0 (the evaluation before the first step): keep no line of an earlier try.
        if metrics.exists() {
            std::fs::write(&metrics, "").with_context(|| format!("cannot empty {}", metrics.display()))?;
        }
    } else {
        crate::metrics::truncate_after(&metrics, step)?;
    }
    if !recipe.run.tensorboard() {
        crate::metrics::tensorboard::remove_event_files(&run_dir.join(TENSORBOARD_DIR))?;
    }
    let root = checkpoint::checkpoints_dir(&run_dir);
    let mut moved = Vec::new();
    let Ok(entries) = std::fs::read_dir(&root) else { return Ok(moved) };
    let mut later: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((checkpoint::parse_step_dir_name(e.file_name().to_str()?)?, e.path())))
        .filter(|(s, _)| *s > step)
        .collect();
    later.sort();
    for (s, path) in later {
        let mut name = format!("{SUPERSEDED_PREFIX}{}", checkpoint::step_dir_name(s));
        let mut n = 1;
        while root.join(&name).exists() {
            n += 1;
            name = format!("{SUPERSEDED_PREFIX}{}-{n}", checkpoint::step_dir_name(s));
        }
        std::fs::rename(&path, root.join(&name)).with_context(|| format!("cannot move {} aside", path.display()))?;
        moved.push(name);
    }
    if !moved.is_empty() && step > 0 {
        // `latest` may name a superseded step: point it at the checkpoint being continued.
        checkpoint::point_latest(&root, step)?;
    }
    Ok(moved)
}
