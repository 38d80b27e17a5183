//! Recipes: a TOML file (plus `--set` overrides) validated into typed settings.
//!
//! ```no_run
//! let recipe = safe::recipe::load(std::path::Path::new("configs/example.toml"), &["rollout.max_new_tokens=32".into()])?;
//! assert_eq!(recipe.rollout.max_new_tokens, 32);
//! # Ok::<(), safe::recipe::RecipeError>(())
//! ```
//!
//! [`schema`] holds every key (type, default, range, doc); [`validate`] is the only code that reads raw input.
//! Everything downstream takes the typed settings and never re-checks them.

pub mod schema;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use schema::{
    AlgorithmKind, BuiltinData, DTypeSpec, LengthStd, LoraBaseDtype, LoraInit, LossType, LrSchedule, ReportTo,
    RewardKind, RolloutSourceKind, RolloutWeights, RuleKind, ScaleRewards, ShapingKind, Value, RESUMABLE_KEYS,
};

/// Everything wrong with a recipe, one problem per line, each starting with `file:line:` or `--set `k=v`:`.
#[derive(Debug, Clone)]
pub struct RecipeError {
    pub problems: Vec<String>,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("\n"))
    }
}

impl std::error::Error for RecipeError {}

/// The largest recipe read: a recipe is a page of TOML; anything bigger (`--config /dev/zero`) is not one.
const MAX_RECIPE_BYTES: u64 = 1 << 20;

/// Read and validate a recipe file, then apply `--set table.key=value` overrides (before cross-key checks).
pub fn load(path: &Path, sets: &[String]) -> Result<Recipe, RecipeError> {
    use std::io::Read;
    let fail = |why: String| RecipeError { problems: vec![format!("{}: {why}", path.display())] };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_RECIPE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| fail(format!("cannot read the recipe: {e}")))?;
    if bytes.len() as u64 > MAX_RECIPE_BYTES {
        return Err(fail(format!("is larger than {} MiB: not a recipe", MAX_RECIPE_BYTES >> 20)));
    }
    let text = String::from_utf8(bytes).map_err(|_| fail("is not UTF-8 text: not a recipe".to_string()))?;
    from_str(&text, &path.display().to_string(), sets)
}

/// Validate recipe text; `origin` names it in messages (usually the file path).
pub fn from_str(text: &str, origin: &str, sets: &[String]) -> Result<Recipe, RecipeError> {
    validate::from_str(text, origin, sets)
}

/// A validated recipe. Settings are public and already checked; [`Recipe::to_toml_string`] gives the resolved file.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub run: RunSettings,
    pub model: ModelSettings,
    pub data: DataSettings,
    pub rollout: RolloutSettings,
    pub algorithm: AlgorithmSettings,
    pub optim: OptimSettings,
    pub shaping: crate::reward::shaping::ShapingConfig,
    /// `[lora]`; `None` (full fine-tuning) when the table is absent.
    pub lora: Option<LoraSettings>,
    pub eval: EvalSettings,
    pub rewards: Vec<RewardSettings>,
    resolved: Resolved,
}

/// Every applicable key with its final value, in schema order: the source of the resolved TOML and the hash.
#[derive(Debug, Clone, PartialEq)]
struct Resolved {
    tables: Vec<(&'static str, Value)>,
    rewards: Vec<Vec<(&'static str, Value)>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    pub name: String,
    pub output_dir: PathBuf,
    pub seed: u64,
    pub max_steps: u64,
    pub log_every: u64,
    /// 0 = only at the end.
    pub save_every: u64,
    pub keep_last: usize,
    /// 0 = never.
    pub completions_every: u64,
    pub max_bad_steps: u64,
    /// `run.report_to`, as given (metrics.jsonl is written whatever it holds).
    pub report_to: Vec<ReportTo>,
}

impl RunSettings {
    /// `<output_dir>/<name>`.
    pub fn dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }

    /// Whether `run.report_to` asks for TensorBoard event files.
    pub fn tensorboard(&self) -> bool {
        self.report_to.contains(&ReportTo::Tensorboard)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// Local HF directory, `.gguf` file or hub id; `crate::model::ModelSource::parse` decides which.
    pub id: String,
    pub revision: String,
    /// `model.reference`: the frozen reference's id (`None`: the starting policy).
    pub reference: Option<String>,
    pub dtype: DTypeSpec,
    pub device: DeviceSpec,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    Jsonl(PathBuf),
    Builtin(BuiltinData),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataSettings {
    pub source: DataSource,
    pub prompt_field: String,
    pub shuffle: bool,
    pub max_prompt_tokens: usize,
    pub chat: bool,
}

/// `[lora]`: adapters on the targeted linear layers; `targets` expanded (`all-linear`) to module names in layer order.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    /// PEFT's lora_dropout.
    pub dropout: f64,
    /// Module names (`q_proj`, ...), in [`crate::model::lora::LINEAR_MODULES`] order.
    pub targets: Vec<String>,
    pub rslora: bool,
    pub init: schema::LoraInit,
    pub base_dtype: LoraBaseDtype,
}

impl LoraSettings {
    /// What the model needs to build the adapters: these settings, the seed of their initialisation and the base
    /// model's id (recorded in `adapter_config.json`).
    pub fn spec(&self, seed: u64, base_model: &str) -> crate::model::lora::LoraSpec {
        crate::model::lora::LoraSpec {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self.targets.clone(),
            rslora: self.rslora,
            base_dtype: match self.base_dtype {
                LoraBaseDtype::Model => None,
                LoraBaseDtype::Bf16 => Some(candle_core::DType::BF16),
            },
            seed,
            base_model: base_model.to_string(),
        }
    }
}

/// Where `[eval]` takes its prompts from.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalData {
    /// No evaluation during training (`safe eval` then evaluates on `data.source`).
    Off,
    /// `eval.source`.
    Source(DataSource),
    /// `eval.split`: this fraction of `data.source`'s rows, held out of training.
    Split(f64),
}

/// `[eval]`, with `eval.max_new_tokens = 0` resolved to `rollout.max_new_tokens`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSettings {
    pub data: EvalData,
    /// 0 = only before the first step and at the end.
    pub every: u64,
    pub num_samples: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub max_new_tokens: usize,
    /// 0 = all.
    pub max_prompts: usize,
    /// `None`: the weighted sum of the recipe's rewards.
    pub reward: Option<String>,
    pub pass_threshold: f64,
}

impl EvalSettings {
    /// Whether training evaluates (a held-out set is named).
    pub fn enabled(&self) -> bool {
        self.data != EvalData::Off
    }

    /// Whether any key besides the data differs from its default (a recipe that sets them without held-out data
    /// gets a note: it probably meant to evaluate).
    pub fn is_customised(&self) -> bool {
        self.every != 0
            || self.num_samples != 1
            || self.temperature != 0.0
            || self.max_prompts != 0
            || self.reward.is_some()
            || self.pass_threshold != 1.0
    }

    /// Whether training evaluates after `step` of a run of `max_steps` (step 0: before the first).
    pub fn due(&self, step: u64, max_steps: u64) -> bool {
        self.enabled() && (step == 0 || step == max_steps || (self.every > 0 && step.is_multiple_of(self.every)))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RolloutSource {
    Sample,
    /// Replay recorded rollouts from this JSONL.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSettings {
    pub prompts_per_step: usize,
    pub num_generations: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 = off.
    pub top_k: usize,
    /// 0.0 = off.
    pub min_p: f64,
    pub repetition_penalty: f64,
    pub stop: Vec<String>,
    pub source: RolloutSource,
    /// 0 = the largest batch the memory plan finds room for (the whole step where memory is unknown).
    pub batch_size: usize,
    /// `rollout.dynamic_sampling = true`: at most this many rounds of `prompts_per_step` prompts per step (`None`:
    /// off).
    pub max_sampling_rounds: Option<usize>,
    /// `rollout.weights = "bf16"`: decode from bf16 copies, with this importance-weight cap (`None`: the model's own
    /// weights, on-policy).
    pub bf16_importance_cap: Option<f64>,
}

impl RolloutSettings {
    /// `prompts_per_step × num_generations`.
    pub fn completions_per_step(&self) -> usize {
        self.prompts_per_step.saturating_mul(self.num_generations)
    }
}

/// `[algorithm]`: which algorithm, its settings (built by the algorithm's own file from its keys), and the
/// micro-batch every algorithm's update runs in.
#[derive(Debug, Clone, PartialEq)]
pub struct AlgorithmSettings {
    pub kind: AlgorithmKind,
    pub settings: crate::algo::Settings,
    /// 0 = auto (the trainer picks); otherwise divides `completions_per_step` (checked at load).
    pub micro_batch_size: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OptimSettings {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// 0.0 = no clipping.
    pub max_grad_norm: f64,
    pub schedule: LrSchedule,
    pub warmup_steps: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RewardSettings {
    pub name: String,
    pub weight: f64,
    pub source: RewardSource,
    /// G-RA: count this reward only where another one's raw value is ≥ `min`.
    pub gate: Option<GateSettings>,
}

/// `gate = { on = "<reward name>", min = δ }` (checked: `on` names another reward, no cycles).
#[derive(Debug, Clone, PartialEq)]
pub struct GateSettings {
    pub on: String,
    pub min: f64,
}

/// One variant per `reward.kind`.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardSource {
    Rule(Rule),
    /// A sequence-classification reward model (see `crate::reward::model`).
    Model {
        id: String,
        chat: bool,
        batch_size: usize,
    },
    /// A long-lived process speaking JSON lines (see `crate::reward::command`).
    Command {
        argv: Vec<String>,
        timeout: f64,
        max_retries: usize,
    },
    /// Reward servers with OpenRLHF's protocol (see `crate::reward::http`).
    Http {
        urls: Vec<String>,
        label_field: String,
        timeout: f64,
        max_retries: usize,
    },
}

/// A rule reward with its (validated) parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Last number in the completion equals the data column `field`.
    ExactAnswer { field: String },
    /// The completion matches `pattern` (compiles: checked at load).
    Regex { pattern: String },
    /// Completion length near `target` tokens.
    Length { target: usize },
    /// The completion contains `text`.
    Contains { text: String },
}

/// `model.device` and `safe generate --device`: auto | cpu | cuda | cuda:N | metal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "metal" => Ok(Self::Metal),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| "one of \"auto\", \"cpu\", \"cuda\", \"cuda:N\", \"metal\"".to_string()),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => f.write_str("metal"),
        }
    }
}

impl DeviceSpec {
    /// Open the device. `auto` takes a GPU when this build has one and the machine has one, else the CPU (with a
    /// note saying why, once): a CUDA build on a machine without a GPU or driver still runs. A GPU that is there
    /// but fails to open (out of memory, exclusive mode) is an error, never a silent run on the CPU.
    pub fn device(self) -> anyhow::Result<candle_core::Device> {
        use anyhow::Context;
        use candle_core::{utils, Device};
        Ok(match self {
            Self::Auto => {
                let gpu = if utils::cuda_is_available() {
                    Some(("CUDA", Device::new_cuda(0)))
                } else if utils::metal_is_available() {
                    Some(("Metal", Device::new_metal(0)))
                } else {
                    None
                };
                match gpu {
                    Some((_, Ok(device))) => device,
                    Some((kind, Err(e))) => {
                        let why = crate::exit::without_backtrace(&e).to_string();
                        if !no_gpu_here(&why) {
                            anyhow::bail!(
                                "device \"auto\": a {kind} device is there but cannot be opened ({why}); free it, or \
                                 set model.device = \"cpu\" to train on the CPU"
                            );
                        }
                        static SAID: std::sync::Once = std::sync::Once::new();
                        SAID.call_once(|| {
                            eprintln!("note: device \"auto\": no usable {kind} device ({why}); using the CPU")
                        });
                        Device::Cpu
                    }
                    None => Device::Cpu,
                }
            }
            Self::Cpu => Device::Cpu,
            Self::Cuda(n) => Device::new_cuda(n).with_context(|| {
                format!("opening cuda:{n} (a build with `--features cuda` and a visible GPU is needed)")
            })?,
            Self::Metal => {
                Device::new_metal(0).context("opening metal (a build with `--features metal` on macOS is needed)")?
            }
        })
    }
}

/// Whether a GPU backend's error says the machine has no GPU or no driver for it (CUDA's driver API codes; Metal
/// reports no device), as opposed to a GPU that is there and failed.
fn no_gpu_here(error: &str) -> bool {
    const NONE: [&str; 6] = [
        "CUDA_ERROR_NO_DEVICE",
        "CUDA_ERROR_STUB_LIBRARY",
        "CUDA_ERROR_INSUFFICIENT_DRIVER",
        "CUDA_ERROR_NOT_INITIALIZED",
        "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        "no metal device",
    ];
    let lower = error.to_ascii_lowercase();
    NONE.iter().any(|code| lower.contains(&code.to_ascii_lowercase()))
}

impl DTypeSpec {
    /// `auto` = f32 on CPU, bf16 on GPU.
    pub fn resolve(self, device: &candle_core::Device) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::Auto if device.is_cpu() => candle_core::DType::F32,
            Self::Auto => candle_core::DType::BF16,
        }
    }
}

impl Recipe {
    /// The fully resolved recipe: every applicable key with its value (defaults included), in schema order.
    /// Loading this text gives back an equal `Recipe`.
    pub fn to_toml_string(&self) -> String {
        let mut out = String::new();
        for t in schema::TABLES {
            if t.array {
                for entry in &self.resolved.rewards {
                    out.push_str(&format!("[[{}]]\n", t.name));
                    write_keys(&mut out, entry.iter().map(|(p, v)| (*p, v)));
                    out.push('\n');
                }
            } else {
                let mut keys = self.resolved.tables.iter().filter(|(p, _)| schema::spec(p).unwrap().table() == t.name);
                if t.optional && keys.next().is_none() {
                    continue; // absent: no header either
                }
                out.push_str(&format!("[{}]\n", t.name));
                let keys = self.resolved.tables.iter().filter(|(p, _)| schema::spec(p).unwrap().table() == t.name);
                write_keys(&mut out, keys.map(|(p, v)| (*p, v)));
                out.push('\n');
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    }

    /// A stable 64-bit FNV-1a hash of the resolved TOML, as 16 hex digits.
    pub fn hash(&self) -> String {
        format!("{:016x}", fnv1a(self.to_toml_string().as_bytes()))
    }

    /// Like [`Recipe::hash`] but ignoring [`RESUMABLE_KEYS`]: equal for recipes a checkpoint may resume under.
    pub fn resume_hash(&self) -> String {
        let mut copy = self.clone();
        copy.resolved.tables.retain(|(p, _)| !RESUMABLE_KEYS.contains(p));
        format!("{:016x}", fnv1a(copy.to_toml_string().as_bytes()))
    }

    /// Paths of keys whose values differ (`reward.<i>.<key>` for rewards), in schema order.
    pub fn changed_keys(&self, other: &Recipe) -> Vec<String> {
        let mut out = Vec::new();
        for spec in schema::KEYS.iter().filter(|s| s.table() != "reward") {
            let find = |r: &Recipe| r.resolved.tables.iter().find(|(p, _)| *p == spec.path).map(|(_, v)| v.clone());
            if find(self) != find(other) {
                out.push(spec.path.to_string());
            }
        }
        let n = self.resolved.rewards.len().max(other.resolved.rewards.len());
        for i in 0..n {
            let (a, b) = (self.resolved.rewards.get(i), other.resolved.rewards.get(i));
            for spec in schema::keys_of("reward") {
                let find = |e: Option<&Vec<(&str, Value)>>| {
                    e.and_then(|e| e.iter().find(|(p, _)| *p == spec.path).map(|(_, v)| v.clone()))
                };
                if find(a) != find(b) {
                    out.push(format!("reward.{i}.{}", spec.name()));
                }
            }
        }
        out
    }

    /// Keys that differ and may not change on resume (empty = resuming under `other` is allowed).
    pub fn resume_conflicts(&self, other: &Recipe) -> Vec<String> {
        self.changed_keys(other).into_iter().filter(|k| !RESUMABLE_KEYS.contains(&k.as_str())).collect()
    }
}

fn write_keys<'a>(out: &mut String, keys: impl Iterator<Item = (&'static str, &'a Value)>) {
    for (path, value) in keys {
        let name = path.split_once('.').map(|(_, k)| k).unwrap_or(path);
        out.push_str(&format!("{name} = {}\n", value.to_toml()));
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Every key grouped by table: `safe check --explain` (text) and docs/recipe.md (`markdown = true`).
pub fn explain(markdown: bool) -> String {
    let mut out = String::new();
    if markdown {
        out.push_str("# Recipe reference\n\n");
        out.push_str("<!-- Generated by `safe check --explain --markdown`; do not edit. Regenerate with:\n");
        out.push_str("     cargo run -- check --explain --markdown > docs/recipe.md -->\n\n");
        out.push_str("A recipe is a TOML file. Every key below may also be set on the command line with\n");
        out.push_str("`--set table.key=value` (`--set reward.0.weight=2` for the first `[[reward]]`); strings need\n");
        out.push_str("no quotes there. Unknown keys are errors. `safe check --config F` prints the resolved recipe.\n");
        out.push_str(&format!(
            "\nKeys that may change when resuming a run: {}.\n",
            RESUMABLE_KEYS.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
        ));
    }
    for t in schema::TABLES {
        let header = if t.array { format!("[[{}]]", t.name) } else { format!("[{}]", t.name) };
        if markdown {
            out.push_str(&format!("\n## `{header}`\n\n{}\n\n", t.doc));
            out.push_str("| key | type | default | description |\n|---|---|---|---|\n");
        } else {
            out.push_str(&format!("{header}\n  {}\n", t.doc));
        }
        for k in schema::keys_of(t.name) {
            let (ty, def) = (k.kind.describe(), k.default_text());
            if markdown {
                let cell = |s: &str| s.replace('|', "\\|").replace('<', "&lt;").replace('>', "&gt;");
                out.push_str(&format!(
                    "| `{}` | {} | `{}` | {} |\n",
                    k.path,
                    cell(&ty),
                    cell(&def).replace('`', "'"),
                    cell(k.doc)
                ));
            } else {
                out.push_str(&format!("  {:<38} {ty}\n      default: {def}\n      {}\n", k.path, k.doc));
            }
        }
        if !markdown {
            out.push('\n');
        }
    }
    out
}
