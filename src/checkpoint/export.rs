//! `safe export`: a LoRA checkpoint as a merged Hugging Face model (`W + s · B A` in every targeted layer, what
//! PEFT's `merge_and_unload` computes) or as its PEFT adapter alone. The output is a new directory, written
//! completely under a temporary name and then renamed into place, so an interrupted export leaves nothing that
//! looks finished.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::{fsio, Checkpoint, ADAPTER_CONFIG_FILE, ADAPTER_FILE, CONFIG_FILE, STATE_FILE};
use crate::model::{ModelConfig, Tokenizer};

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Export {
    /// A plain model with the adapters merged into its weights, in `dtype` (default: the checkpoint's own).
    Merged { dtype: Option<DType> },
    /// `adapter_config.json` + `adapter_model.safetensors`, as PEFT's `save_pretrained` writes them.
    Adapter,
}

/// An export checked and loaded, ready to write: every problem of the input is found before this exists.
pub struct PreparedExport {
    /// The checkpoint (or model directory) the export reads.
    pub source: PathBuf,
    pub out: PathBuf,
    /// The merged weights' dtype (`None` for an adapter export).
    pub dtype: Option<DType>,
    content: Content,
}

enum Content {
    Merged(Box<MergedModel>),
    Adapter,
}

struct MergedModel {
    config: ModelConfig,
    tensors: Vec<(String, Tensor)>,
    tokenizer: Option<Tokenizer>,
}

/// Check and load an export of `source` (a checkpoint directory, a run directory, whose newest complete checkpoint
/// is taken, or a model directory holding adapters; a plain one only to change its dtype) into `out`, a directory
/// that must not exist yet or be empty.
/// A checkpoint is verified against the digests its `state.json` records. Every error is bad input.
pub fn export(source: &Path, out: &Path, what: Export) -> Result<PreparedExport> {
    let source = resolve_source(source)?;
    check_out(out, &source)?;
    // A plain model (a full fine-tuning checkpoint) has nothing to merge, but `--merge OUT --dtype D` writes it in
    // another dtype: a bf16 copy of a bf16 run's f32 master weights.
    let converts = matches!(what, Export::Merged { dtype: Some(_) });
    if !source.join(ADAPTER_CONFIG_FILE).is_file() && !converts {
        bail!(
            "{} holds no LoRA adapters (no {ADAPTER_CONFIG_FILE}): it is already a plain model directory, with \
             nothing to merge or export (`--merge OUT --dtype f32|bf16|f16` writes a copy in another dtype)",
            source.display()
        );
    }
    let (dtype, content) = match what {
        Export::Adapter => {
            // Parsed and checked, though only copied: an adapter export of damaged files is refused.
            crate::model::lora::read_adapters(&source, &Device::Cpu, DType::F32)?;
            (None, Content::Adapter)
        }
        Export::Merged { dtype } => {
            let dtype = match dtype {
                Some(d) => d,
                None => stored_dtype(&source)?,
            };
            let loaded = crate::model::LoadedModel::load(
                &crate::model::ModelSource::Dir(source.clone()),
                &Device::Cpu,
                DType::F32,
            )?;
            // The load reads and checks the adapters beside the weights; a weights-only directory (no
            // tokenizer.json) exports weights-only too.
            let (model, tokenizer) = loaded.into_model(false, &Device::Cpu, DType::F32)?;
            let tensors = model
                .merged_tensors()?
                .into_iter()
                .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
                .collect::<Result<Vec<_>>>()?;
            (Some(dtype), Content::Merged(Box::new(MergedModel { config: model.config().clone(), tensors, tokenizer })))
        }
    };
    Ok(PreparedExport { source, out: out.to_path_buf(), dtype, content })
}

impl PreparedExport {
    /// Write the export: into a temporary directory beside `out`, fsynced, then renamed to `out`. Returns the
    /// files written. A failure removes the temporary directory and leaves `out` as it was.
    pub fn write(&self) -> Result<Vec<String>> {
        let parent = match self.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let name = self.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = parent.join(format!("{}export-{name}-{}", super::TMP_PREFIX, std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove stale {}", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let written = self.write_into(&tmp).and_then(|files| {
            fsio::sync_dir(&tmp)?;
            if self.out.is_dir() {
                // Checked empty by `export`; `rename` onto an empty directory is not portable.
                std::fs::remove_dir(&self.out).with_context(|| format!("cannot replace {}", self.out.display()))?;
            }
            std::fs::rename(&tmp, &self.out)
                .with_context(|| format!("cannot move {} to {}", tmp.display(), self.out.display()))?;
            fsio::sync_dir(&parent)?;
            Ok(files)
        });
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written
    }

    fn write_into(&self, dir: &Path) -> Result<Vec<String>> {
        match &self.content {
            Content::Merged(m) => {
                let dtype = self.dtype.expect("a merged export has a dtype");
                super::write_model_files(dir, &m.config, &m.tensors, dtype, m.tokenizer.as_ref())?;
            }
            Content::Adapter => {
                for file in [ADAPTER_CONFIG_FILE, ADAPTER_FILE] {
                    let (from, to) = (self.source.join(file), dir.join(file));
                    std::fs::copy(&from, &to)
                        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
                    fsio::sync_file(&to)?;
                }
            }
        }
        let mut files: Vec<String> = std::fs::read_dir(dir)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        files.sort();
        Ok(files)
    }
}

/// The directory to read: a checkpoint (verified), a run directory's newest complete checkpoint, or a model
/// directory as it is.
fn resolve_source(source: &Path) -> Result<PathBuf> {
    if !source.is_dir() {
        bail!("{} is not a directory (expected a checkpoint directory or a run directory)", source.display());
    }
    let dir = if super::checkpoints_dir(source).is_dir() {
        super::latest_complete(source).with_context(|| {
            format!("run directory {} has no complete checkpoint under {}", source.display(), super::CHECKPOINTS_DIR)
        })?
    } else {
        source.to_path_buf()
    };
    if dir.join(STATE_FILE).is_file() {
        Checkpoint::open(&dir).with_context(|| format!("cannot export checkpoint {}", dir.display()))?;
    } else if !dir.join(CONFIG_FILE).is_file() {
        bail!(
            "{} has neither {STATE_FILE} nor {CONFIG_FILE} (expected a checkpoint directory, a run directory or a \
             model directory with LoRA adapters)",
            dir.display()
        );
    }
    Ok(dir)
}

/// `out` must be new (or an empty directory) and outside the checkpoint it is made from.
fn check_out(out: &Path, source: &Path) -> Result<()> {
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))?.next().is_none();
        if !empty {
            bail!("{} already exists and is not an empty directory; export writes a new directory", out.display());
        }
    }
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if abs(out).starts_with(abs(source)) {
        bail!("{} is inside {}: export into a directory of its own", out.display(), source.display());
    }
    Ok(())
}

/// The dtype `config.json` records for the weights (`dtype`, or `torch_dtype` as older transformers wrote it);
/// f32 when it names none.
fn stored_dtype(dir: &Path) -> Result<DType> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let name = v.get("dtype").or_else(|| v.get("torch_dtype")).and_then(|d| d.as_str());
    Ok(match name {
        None | Some("float32") => DType::F32,
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        Some(other) => bail!("{}: dtype `{other}` is not one export writes; pass --dtype", path.display()),
    })
}
