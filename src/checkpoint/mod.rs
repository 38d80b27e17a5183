//! Checkpoints: `<run_dir>/checkpoints/step-<N>/`, each one a Hugging Face model directory (so transformers and
//! `safe generate` open it unchanged) plus the optimizer moments and the training state needed for exact resume.
//!
//! Crash safety is by construction, not by recovery: a checkpoint is written completely into a hidden temporary
//! directory, fsynced, and only then renamed into place; `latest` is replaced the same way. A process killed at any
//! moment leaves every visible `step-*` directory complete and `latest` naming one of them (or nothing new).
//!
//! Damage after the fact (a disk error, a copy cut short, an edit) is caught on resume: `state.json` records a
//! SHA-256 of every other file, and opening a checkpoint compares them. `--resume auto` takes the newest checkpoint
//! that passes, saying why it passed over any newer one, and refuses a run whose checkpoints all fail rather than
//! silently starting it over.

mod export;
mod fsio;
mod integrity;
mod safetensors_io;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::{CausalLm, Tokenizer};
use crate::optim::adamw::{AdamW, AdamWState};

pub use crate::model::lora::{ADAPTER_CONFIG_FILE, ADAPTER_FILE};
pub use export::{export, Export, PreparedExport};
pub use safetensors_io::write_safetensors;

/// Folder under the run directory that holds every checkpoint.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Pointer file in [`CHECKPOINTS_DIR`] naming the newest complete checkpoint directory.
pub const LATEST_FILE: &str = "latest";
/// Written last; its `complete: true` marks a checkpoint usable.
pub const STATE_FILE: &str = "state.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Prefix of every in-progress or half-deleted entry; anything with it is garbage on the next save.
const TMP_PREFIX: &str = ".tmp-";
/// Checkpoints after the one a run was resumed from are moved aside under this prefix; they count toward
/// `run.keep_last` and are the first rotated out.
pub const SUPERSEDED_PREFIX: &str = "superseded-";
/// Checkpoints `--resume auto` passed over as damaged are moved aside under this prefix and never deleted: a file
/// missing mid-copy or an I/O error looks like damage, and what it hides may still be recovered by hand.
pub const DAMAGED_PREFIX: &str = "damaged-";
/// Bumped when `state.json` changes incompatibly.
const STATE_FORMAT: u32 = 1;

/// Files a checkpoint must have besides `state.json` to count as complete.
const REQUIRED_FILES: [&str; 3] = [MODEL_FILE, CONFIG_FILE, OPTIMIZER_FILE];

/// `step-<N>`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// The step of a `step-<N>` directory name (`None` for anything else, including temporaries).
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `<run_dir>/checkpoints`.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINTS_DIR)
}

/// Everything one checkpoint holds. Extra tensor files (e.g. a critic) are `(file name, tensors)` pairs.
pub struct SaveRequest<'a> {
    pub step: u64,
    pub model: &'a CausalLm,
    pub tokenizer: &'a Tokenizer,
    pub optimizer: &'a AdamW,
    /// The trainer's state (data cursor, RNG, schedule position, controllers, recipe hash, ...), stored verbatim.
    pub training_state: &'a serde_json::Value,
    pub extra_tensor_files: &'a [(String, Vec<(String, Tensor)>)],
}

/// `state.json`. Field order is the file's key order, so `complete` is literally written last.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    safe_version: String,
    step: u64,
    optimizer: AdamWState,
    training: serde_json::Value,
    /// Hex SHA-256 of every other file of the checkpoint, by name (empty in checkpoints older than the digests).
    #[serde(default)]
    files: BTreeMap<String, String>,
    /// Hex SHA-256 of the fields above as JSON ([`StateFile::digest_of_fields`]): an edit or a flipped bit in
    /// `state.json` itself (the data position, a controller) is caught like one in a tensor file.
    #[serde(default)]
    digest: String,
    #[serde(default)]
    complete: bool,
}

impl StateFile {
    /// The SHA-256 of every field but `digest` and `complete`, serialized compactly in field order. A parsed file
    /// reserializes to the same bytes (`float_roundtrip` keeps every float exact), so the digest can be recomputed.
    fn digest_of_fields(&self) -> Result<String> {
        #[derive(Serialize)]
        struct Covered<'a> {
            format: u32,
            safe_version: &'a str,
            step: u64,
            optimizer: &'a AdamWState,
            training: &'a serde_json::Value,
            files: &'a BTreeMap<String, String>,
        }
        let covered = Covered {
            format: self.format,
            safe_version: &self.safe_version,
            step: self.step,
            optimizer: &self.optimizer,
            training: &self.training,
            files: &self.files,
        };
        use sha2::Digest;
        Ok(format!("{:x}", sha2::Sha256::digest(serde_json::to_vec(&covered)?)))
    }
}

/// Save a checkpoint atomically, point `latest` at it, then rotate to `keep_last` (0 keeps every checkpoint).
/// Returns the checkpoint directory. Saving a step that already exists (a resumed run re-reaching it) replaces it
/// with an atomic directory swap where the OS supports one.
pub fn save(run_dir: &Path, req: &SaveRequest, keep_last: usize) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    remove_stale_temporaries(&root)?;

    let name = step_dir_name(req.step);
    let pid = std::process::id();
    let tmp = root.join(format!("{TMP_PREFIX}{name}-{pid}"));
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = write_contents(&tmp, req).and_then(|_| fsio::sync_dir(&tmp)) {
        // A full disk must not stay full of our half-written checkpoint: remove it (best effort; the next save
        // removes any leftover anyway).
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint {} (removed)", tmp.display())));
    }

    let dest = root.join(&name);
    fsio::replace_dir(&tmp, &dest, &root.join(format!("{TMP_PREFIX}old-{name}-{pid}")))
        .with_context(|| format!("cannot move checkpoint into {}", dest.display()))?;
    fsio::sync_dir(&root)?;

    point_latest(&root, req.step)?;
    rotate(&root, keep_last)?;
    Ok(dest)
}

/// Point `latest` at `step-<step>` under `root` (the checkpoints directory), if that checkpoint exists there.
pub fn point_latest(root: &Path, step: u64) -> Result<()> {
    let name = step_dir_name(step);
    if !root.join(&name).is_dir() {
        return Ok(());
    }
    let tmp = root.join(format!("{TMP_PREFIX}latest-{}", std::process::id()));
    fsio::write_atomic(&root.join(LATEST_FILE), format!("{name}\n").as_bytes(), &tmp)
}

/// Write every file of a checkpoint into `dir`, each fsynced, `state.json` last.
fn write_contents(dir: &Path, req: &SaveRequest) -> Result<()> {
    let model = req.model;
    write_model_files(dir, model.config(), &model.named_tensors(), model.dtype(), Some(req.tokenizer))?;
    write_safetensors(&dir.join(OPTIMIZER_FILE), &req.optimizer.state_tensors())?;
    // LoRA: model.safetensors holds the frozen base; the adapters go beside it in PEFT's format (resume reads them
    // back from there).
    write_adapter_files(dir, model)?;
    for (file, tensors) in req.extra_tensor_files {
        let reserved = [STATE_FILE, MODEL_FILE, OPTIMIZER_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE];
        if file.contains('/') || file.starts_with('.') || reserved.contains(&&**file) {
            bail!("extra checkpoint file name `{file}` is not allowed");
        }
        write_safetensors(&dir.join(file), tensors)?;
    }
    let mut state = StateFile {
        format: STATE_FORMAT,
        safe_version: env!("CARGO_PKG_VERSION").to_string(),
        step: req.step,
        optimizer: req.optimizer.state(),
        training: req.training_state.clone(),
        files: integrity::digests(dir, STATE_FILE)?,
        digest: String::new(),
        complete: true,
    };
    state.digest = state.digest_of_fields()?;
    // Serialized from the struct, not a `Value` (whose map sorts keys), so `complete` stays last.
    fsio::write_synced(&dir.join(STATE_FILE), &pretty(&state)?)
}

/// A Hugging Face model directory's files, each fsynced: `model.safetensors` (`tensors`, HF names, in `dtype`),
/// `config.json`, `generation_config.json` and the tokenizer's files (when there is a tokenizer). What
/// transformers' `from_pretrained` opens.
pub fn write_model_files(
    dir: &Path,
    cfg: &crate::model::ModelConfig,
    tensors: &[(String, Tensor)],
    dtype: DType,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    write_safetensors(&dir.join(MODEL_FILE), tensors)?;
    fsio::write_synced(&dir.join(CONFIG_FILE), &pretty(&cfg.to_hf_json(hf_dtype_name(dtype)?))?)?;
    fsio::write_synced(&dir.join(GENERATION_CONFIG_FILE), &pretty(&cfg.special_token_json())?)?;
    if let Some(tokenizer) = tokenizer {
        tokenizer.save(dir)?;
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            fsio::sync_file(&dir.join(file))?;
        }
    }
    Ok(())
}

/// A LoRA model's adapters in PEFT's format, as a checkpoint holds them: `adapter_model.safetensors` (PEFT's
/// names) and `adapter_config.json` (`LoraSpec::peft_config`). Nothing for a model without adapters; returns
/// whether it wrote them. `PeftModel.from_pretrained(base, dir)` loads the two files as they are.
pub fn write_adapter_files(dir: &Path, model: &CausalLm) -> Result<bool> {
    let Some(spec) = model.lora() else { return Ok(false) };
    write_safetensors(&dir.join(ADAPTER_FILE), &model.adapter_tensors())?;
    fsio::write_synced(&dir.join(ADAPTER_CONFIG_FILE), &pretty(&spec.peft_config())?)?;
    Ok(true)
}

fn pretty<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s.into_bytes())
}

/// transformers' name for a dtype in `config.json`.
fn hf_dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        other => bail!("cannot save a model in {other:?}"),
    })
}

/// Remove leftovers of interrupted saves and rotations (anything named `.tmp-*`).
fn remove_stale_temporaries(root: &Path) -> Result<()> {
    for entry in std::fs::read_dir(root).with_context(|| format!("cannot list {}", root.display()))? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let removed =
            if entry.file_type()?.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.with_context(|| format!("cannot remove stale {}", path.display()))?;
    }
    Ok(())
}

/// Whether `dir` holds a finished checkpoint: `state.json` parses with `complete: true` and the weight files exist.
pub fn is_complete(dir: &Path) -> bool {
    read_state(dir).is_ok_and(|s| s.complete) && REQUIRED_FILES.iter().all(|f| dir.join(f).is_file())
}

/// Every `step-*` directory under `root`, complete or not, oldest first (none if `root` cannot be listed).
fn step_dirs(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((parse_step_dir_name(e.file_name().to_str()?)?, e.path())))
        .collect();
    out.sort_by_key(|(step, _)| *step);
    out
}

/// Complete `step-*` checkpoints under `root`, oldest first.
fn complete_steps(root: &Path) -> Vec<(u64, PathBuf)> {
    step_dirs(root).into_iter().filter(|(_, p)| is_complete(p)).collect()
}

/// The directory `latest` names, if it is a plain `step-<N>` name.
fn latest_pointer(root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(root.join(LATEST_FILE)).ok()?;
    let name = text.trim();
    parse_step_dir_name(name)?;
    Some(root.join(name))
}

/// The newest complete checkpoint (the highest step marked complete with its files present), whatever `latest`
/// says: a pointer left behind by an older process must not send a resume back in time.
pub fn latest_complete(run_dir: &Path) -> Option<PathBuf> {
    complete_steps(&checkpoints_dir(run_dir)).pop().map(|(_, p)| p)
}

/// What `--resume auto` found: the newest intact checkpoint, and a reason for each newer one passed over.
#[derive(Debug)]
pub struct NewestIntact {
    pub checkpoint: Checkpoint,
    /// Each newer checkpoint passed over: its directory and what is wrong with it.
    pub passed_over: Vec<(PathBuf, String)>,
}

/// Move a checkpoint `--resume auto` passed over aside as `damaged-step-<N>` (never rotated out); returns the new
/// path.
pub fn set_aside_damaged(dir: &Path) -> Result<PathBuf> {
    let root = dir.parent().context("a checkpoint directory has a parent")?;
    let name = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut dest = root.join(format!("{DAMAGED_PREFIX}{name}"));
    let mut n = 1;
    while dest.exists() {
        n += 1;
        dest = root.join(format!("{DAMAGED_PREFIX}{name}-{n}"));
    }
    std::fs::rename(dir, &dest).with_context(|| format!("cannot move {} aside", dir.display()))?;
    Ok(dest)
}

/// The checkpoint `--resume auto` continues: the highest `step-<N>` that opens and verifies. `Ok(None)` when the run
/// has no checkpoint directory at all (a fresh start); an error naming every checkpoint and what is wrong with it
/// when none is intact, so a damaged run is never silently started over.
pub fn newest_intact(run_dir: &Path) -> Result<Option<NewestIntact>> {
    let root = checkpoints_dir(run_dir);
    let mut passed_over = Vec::new();
    for (_, dir) in step_dirs(&root).iter().rev() {
        match Checkpoint::open(dir) {
            Ok(checkpoint) => return Ok(Some(NewestIntact { checkpoint, passed_over })),
            Err(e) => passed_over.push((dir.clone(), format!("{e:#}"))),
        }
    }
    if passed_over.is_empty() {
        return Ok(None);
    }
    let listed: Vec<String> =
        passed_over.iter().map(|(dir, why)| format!("checkpoint {} is not usable: {why}", dir.display())).collect();
    bail!(
        "no intact checkpoint in {} to resume from:\n  {}\nResume from a copy with --resume DIR, or start over with \
         --resume never --overwrite (deletes the run)",
        root.display(),
        listed.join("\n  ")
    )
}

/// Delete the oldest checkpoints beyond `keep_last`, counting the superseded ones (moved aside by a resume from an
/// earlier step) and rotating those out first; never the newest complete step, never `latest`'s. Each is renamed
/// to a temporary name before deletion, so a crash mid-delete leaves garbage, not a broken step.
fn rotate(root: &Path, keep_last: usize) -> Result<()> {
    if keep_last == 0 {
        return Ok(());
    }
    let steps = complete_steps(root);
    let mut superseded: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("cannot list {}", root.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(SUPERSEDED_PREFIX))
        .map(|e| e.path())
        .collect();
    // Oldest first: by the step in the name (`superseded-step-<N>[-<k>]`), then by name.
    superseded.sort_by_key(|p| {
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let step = name
            .strip_prefix(SUPERSEDED_PREFIX)
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.split('-').next()?.parse::<u64>().ok());
        (step, name)
    });
    let protected = latest_pointer(root);
    let newest = steps.last().map(|(_, p)| p.clone());
    let excess = (steps.len() + superseded.len()).saturating_sub(keep_last.max(1));
    let candidates = superseded.iter().chain(steps.iter().map(|(_, p)| p));
    let doomed: Vec<&PathBuf> =
        candidates.filter(|p| protected.as_ref() != Some(*p) && newest.as_ref() != Some(*p)).take(excess).collect();
    let pid = std::process::id();
    for path in doomed {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let doomed = root.join(format!("{TMP_PREFIX}rotate-{name}-{pid}"));
        std::fs::rename(path, &doomed).with_context(|| format!("cannot rotate out {}", path.display()))?;
        std::fs::remove_dir_all(&doomed).with_context(|| format!("cannot remove {}", doomed.display()))?;
    }
    fsio::sync_dir(root)
}

fn read_state(dir: &Path) -> Result<StateFile> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} cannot be read (not a checkpoint, or an incomplete one)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is corrupt (not a valid checkpoint state)", path.display()))
}

/// Read a part of a checkpoint's state (`prefix` names it, e.g. `training`) into `T`; an error names the field that
/// is missing or of the wrong type (`training.sampler.cursor: invalid type: string "x", expected u64`), so an old,
/// edited or truncated `state.json` is a clear error, never a panic.
pub fn from_state<T: serde::de::DeserializeOwned>(value: &serde_json::Value, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." { prefix.to_string() } else { format!("{prefix}.{path}") };
        anyhow::anyhow!("`{at}`: {}", e.into_inner())
    })
}

/// A complete checkpoint on disk.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    state: StateFile,
}

impl Checkpoint {
    /// Open a checkpoint directory and verify its files; errors name `state.json` when it is missing, corrupt or
    /// not marked complete, and the file that is missing, truncated or does not match its recorded SHA-256.
    pub fn open(dir: &Path) -> Result<Self> {
        let state = read_state(dir)?;
        let path = dir.join(STATE_FILE);
        if !state.complete {
            bail!("{} is not marked complete (an interrupted checkpoint)", path.display());
        }
        if state.format != STATE_FORMAT {
            bail!("{} has format {}, this safe reads format {STATE_FORMAT}", path.display(), state.format);
        }
        for f in REQUIRED_FILES {
            if !dir.join(f).is_file() {
                bail!("checkpoint {} has no {f}", dir.display());
            }
        }
        // Checkpoints older than the digests have neither; one without the other is an edit.
        if !(state.files.is_empty() && state.digest.is_empty()) && state.digest != state.digest_of_fields()? {
            bail!(
                "{} does not match its own SHA-256 (`digest`): edited or damaged since it was written",
                path.display()
            );
        }
        integrity::verify(dir, &state.files)?;
        Ok(Self { dir: dir.to_path_buf(), state })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn step(&self) -> u64 {
        self.state.step
    }
    /// The `safe` version that wrote it.
    pub fn safe_version(&self) -> &str {
        &self.state.safe_version
    }
    /// An HF model directory: open it with `LoadedModel::load(&ModelSource::Dir(..))` or transformers.
    pub fn model_dir(&self) -> &Path {
        &self.dir
    }
    /// The trainer's state exactly as passed to [`save`].
    pub fn state(&self) -> &serde_json::Value {
        &self.state.training
    }
    pub fn optimizer_state(&self) -> AdamWState {
        self.state.optimizer
    }
    /// The AdamW moments from `optimizer.safetensors`.
    pub fn optimizer_tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        self.tensor_file(OPTIMIZER_FILE, device)
    }
    /// Restore `optimizer` (built over the reloaded model's vars) to the saved moments and step.
    pub fn restore_optimizer(&self, optimizer: &mut AdamW) -> Result<()> {
        let device = optimizer.vars().first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
        let tensors = self.optimizer_tensors(&device)?;
        optimizer
            .load_state(&self.state.optimizer, &tensors)
            .with_context(|| format!("restoring the optimizer from {}", self.dir.join(OPTIMIZER_FILE).display()))
    }
    /// Any safetensors file of the checkpoint (e.g. an extra file passed to [`save`]).
    pub fn tensor_file(&self, file: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
        let path = self.dir.join(file);
        candle_core::safetensors::load(&path, device).with_context(|| format!("cannot read {}", path.display()))
    }
}
