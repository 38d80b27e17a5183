//! The recipe schema: every key's type, default, allowed values and one-line doc, in one table.
//!
//! Everything else derives from [`KEYS`]: parsing and `--set` typing (validate.rs), defaults, the resolved TOML,
//! `safe check --explain` and docs/recipe.md. Adding a key means adding one [`KeySpec`] here and one field in the
//! typed settings (mod.rs); a test checks every default parses under its own kind.

use std::fmt;

/// A recipe value after typing. Floats and integers stay distinct so `--set` and the resolved TOML keep the kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    List(Vec<Value>),
}

impl Value {
    /// The value as a TOML literal. `{:?}` on f64 is the shortest text that parses back to the same bits.
    pub fn to_toml(&self) -> String {
        match self {
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format!("{f:?}"),
            Value::Bool(b) => b.to_string(),
            Value::Str(s) => toml_edit::Value::from(s.as_str()).to_string().trim().to_string(),
            Value::List(items) => format!("[{}]", items.iter().map(Value::to_toml).collect::<Vec<_>>().join(", ")),
        }
    }

    /// From a parsed TOML value; `Err` names the TOML type we have no use for.
    pub fn from_toml(v: &toml_edit::Value) -> Result<Value, &'static str> {
        use toml_edit::Value as V;
        Ok(match v {
            V::String(s) => Value::Str(s.value().clone()),
            V::Integer(i) => Value::Int(*i.value()),
            V::Float(f) => Value::Float(*f.value()),
            V::Boolean(b) => Value::Bool(*b.value()),
            V::Array(a) => Value::List(a.iter().map(Value::from_toml).collect::<Result<_, _>>()?),
            V::Datetime(_) => return Err("a date/time"),
            V::InlineTable(_) => return Err("an inline table"),
        })
    }

    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Str(_) => "a string",
            Value::List(_) => "a list",
        }
    }
}

/// A closed or open interval of floats.
#[derive(Debug, Clone, Copy)]
pub struct FloatRange {
    pub min: f64,
    pub max: f64,
    pub min_open: bool,
    pub max_open: bool,
}

impl FloatRange {
    pub const fn new(min: f64, max: f64) -> Self {
        Self { min, max, min_open: false, max_open: false }
    }
    pub const fn positive() -> Self {
        Self { min: 0.0, max: f64::INFINITY, min_open: true, max_open: false }
    }
    pub const fn non_negative() -> Self {
        Self::new(0.0, f64::INFINITY)
    }
    pub fn contains(&self, x: f64) -> bool {
        x.is_finite()
            && (if self.min_open { x > self.min } else { x >= self.min })
            && (if self.max_open { x < self.max } else { x <= self.max })
    }
}

impl fmt::Display for FloatRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.max.is_infinite() {
            return write!(f, "{} {}", if self.min_open { ">" } else { "≥" }, self.min);
        }
        let (l, r) = (if self.min_open { "(" } else { "[" }, if self.max_open { ")" } else { "]" });
        write!(f, "in {l}{}, {}{r}", self.min, self.max)
    }
}

/// A rule a string value must follow beyond being a string; `Err` says what is allowed.
pub type StrCheck = fn(&str) -> Result<(), String>;

/// What a key accepts.
#[derive(Clone, Copy)]
pub enum Kind {
    Int {
        min: i64,
        max: i64,
    },
    Float(FloatRange),
    Bool,
    /// A string; `check` adds a rule beyond "is a string" (non-empty, a device spec, a compiling regex...).
    Str {
        check: Option<StrCheck>,
    },
    /// One of a fixed set of strings (the `NAMES` of a [`choice_enum!`] type).
    Choice(&'static [&'static str]),
    StrList,
    /// A list of strings, each one of a fixed set (the `NAMES` of a [`choice_enum!`] type).
    ChoiceList(&'static [&'static str]),
    /// Exactly two floats, each in the range (Adam's betas).
    FloatPair(FloatRange),
}

/// Why a value does not fit a [`Kind`].
pub enum Mismatch {
    /// Wrong TOML type: the message says what was expected.
    Type { expected: String },
    /// Right type, outside the allowed values.
    Range { allowed: String },
}

impl Kind {
    /// Short type name for docs and messages.
    pub fn describe(&self) -> String {
        match self {
            Kind::Int { min, max } if *max == i64::MAX => format!("integer ≥ {min}"),
            Kind::Int { min, max } => format!("integer in [{min}, {max}]"),
            Kind::Float(r) if r.min == f64::NEG_INFINITY && r.max == f64::INFINITY => "number".into(),
            Kind::Float(r) => format!("number {r}"),
            Kind::Bool => "boolean".into(),
            Kind::Str { .. } => "string".into(),
            Kind::Choice(names) => names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(" | "),
            Kind::StrList => "list of strings".into(),
            Kind::ChoiceList(names) => format!("list of {}", Kind::Choice(names).describe()),
            Kind::FloatPair(r) => format!("[number, number], each {r}"),
        }
    }

    /// The type part of a "must be ..." message.
    pub fn expected(&self) -> String {
        match self {
            Kind::Int { .. } => "an integer".into(),
            Kind::Float(_) => "a number".into(),
            Kind::Bool => "true or false".into(),
            Kind::Str { .. } => "a string".into(),
            Kind::Choice(_) => format!("a string, one of {}", self.describe()),
            Kind::StrList => "a list of strings, e.g. [\"\\n\\n\"]".into(),
            Kind::ChoiceList(names) => format!("a list of strings, each one of {}", Kind::Choice(names).describe()),
            Kind::FloatPair(_) => "a list of two numbers, e.g. [0.9, 0.999]".into(),
        }
    }

    /// Whether a `--set` value for this key is taken verbatim when it is not a quoted TOML string.
    pub fn is_stringy(&self) -> bool {
        matches!(self, Kind::Str { .. } | Kind::Choice(_))
    }

    /// Type and range check; returns the normalised value (integers widen to floats for float keys).
    pub fn check(&self, v: &Value) -> Result<Value, Mismatch> {
        let ty = || Mismatch::Type { expected: self.expected() };
        match (self, v) {
            (Kind::Int { min, max }, Value::Int(i)) => {
                if i < min || i > max {
                    return Err(Mismatch::Range { allowed: self.describe() });
                }
                Ok(v.clone())
            }
            (Kind::Int { .. }, _) => Err(ty()),
            (Kind::Float(r), Value::Int(_) | Value::Float(_)) => {
                let x = match v {
                    Value::Int(i) => *i as f64,
                    Value::Float(x) => *x,
                    _ => unreachable!(),
                };
                if !r.contains(x) {
                    return Err(Mismatch::Range { allowed: self.describe() });
                }
                Ok(Value::Float(x))
            }
            (Kind::Float(_), _) => Err(ty()),
            (Kind::Bool, Value::Bool(_)) => Ok(v.clone()),
            (Kind::Bool, _) => Err(ty()),
            (Kind::Str { check }, Value::Str(s)) => {
                if let Some(check) = check {
                    check(s).map_err(|allowed| Mismatch::Range { allowed })?;
                }
                Ok(v.clone())
            }
            (Kind::Str { .. }, _) => Err(ty()),
            (Kind::Choice(names), Value::Str(s)) => {
                if !names.contains(&s.as_str()) {
                    return Err(Mismatch::Range { allowed: format!("one of {}", self.describe()) });
                }
                Ok(v.clone())
            }
            (Kind::Choice(_), _) => Err(ty()),
            (Kind::StrList, Value::List(items)) if items.iter().all(|i| matches!(i, Value::Str(_))) => Ok(v.clone()),
            (Kind::StrList, _) => Err(ty()),
            (Kind::ChoiceList(names), Value::List(items)) if items.iter().all(|i| matches!(i, Value::Str(_))) => {
                match items.iter().find(|i| !matches!(i, Value::Str(s) if names.contains(&s.as_str()))) {
                    Some(bad) => Err(Mismatch::Range {
                        allowed: format!("a list of {} ({} is not one)", Kind::Choice(names).describe(), bad.to_toml()),
                    }),
                    None => Ok(v.clone()),
                }
            }
            (Kind::ChoiceList(_), _) => Err(ty()),
            (Kind::FloatPair(r), Value::List(items)) if items.len() == 2 => {
                let mut out = Vec::new();
                for item in items {
                    let x = match item {
                        Value::Int(i) => *i as f64,
                        Value::Float(x) => *x,
                        _ => return Err(ty()),
                    };
                    if !r.contains(x) {
                        return Err(Mismatch::Range { allowed: self.describe() });
                    }
                    out.push(Value::Float(x));
                }
                Ok(Value::List(out))
            }
            (Kind::FloatPair(_), _) => Err(ty()),
        }
    }
}

/// A key's default.
#[derive(Clone, Copy)]
pub enum Default {
    /// A TOML literal, typed by the key's kind like any other value.
    Value(&'static str),
    /// No default: the recipe must give it (when the key applies).
    Required,
    /// Copies another key's resolved value (`algorithm.epsilon_high` = `algorithm.epsilon`).
    SameAs(&'static str),
    /// May be left out: then it is absent from the resolved recipe (`reward.gate.on`: no gate).
    Optional,
    /// A TOML literal that depends on `algorithm.kind` (a key of the same table resolved before it): each
    /// algorithm keeps its reference implementation's default (`algorithm.beta`: TRL GRPO 0.0, TRL RLOO 0.05).
    ByAlgorithm { value: &'static str, overrides: &'static [(&'static str, &'static str)] },
}

/// A key that only applies when another key (of an earlier table, the same table or the same `[[reward]]` entry)
/// has a given value.
#[derive(Clone, Copy)]
pub struct When {
    pub key: &'static str,
    pub is: &'static [&'static str],
}

pub struct KeySpec {
    /// `table.key`; for array tables the path has no index (`reward.weight`).
    pub path: &'static str,
    pub kind: Kind,
    pub default: Default,
    pub when: Option<When>,
    pub doc: &'static str,
}

impl KeySpec {
    pub fn table(&self) -> &'static str {
        self.path.split_once('.').map(|(t, _)| t).unwrap_or(self.path)
    }
    pub fn name(&self) -> &'static str {
        self.path.split_once('.').map(|(_, k)| k).unwrap_or(self.path)
    }
    /// The literal default typed by the key's own kind; `None` for required and `SameAs` defaults, or a bad literal.
    pub fn default_value(&self) -> Option<Value> {
        let lit = match self.default {
            Default::Value(lit) | Default::ByAlgorithm { value: lit, .. } => lit,
            _ => return None,
        };
        self.literal(lit)
    }

    /// The default under `algorithm.kind` = `algorithm` (for [`Default::ByAlgorithm`]; others as [`Self::default_value`]).
    pub fn default_for(&self, algorithm: &str) -> Option<Value> {
        match self.default {
            Default::ByAlgorithm { value, overrides } => {
                self.literal(overrides.iter().find(|(a, _)| *a == algorithm).map_or(value, |(_, v)| v))
            }
            _ => self.default_value(),
        }
    }

    fn literal(&self, lit: &str) -> Option<Value> {
        let v = Value::from_toml(&lit.parse::<toml_edit::Value>().ok()?).ok()?;
        self.kind.check(&v).ok()
    }

    /// The default as docs show it.
    pub fn default_text(&self) -> String {
        let base = match self.default {
            Default::Value(lit) => lit.to_string(),
            Default::ByAlgorithm { value, overrides } => {
                let per: Vec<String> = overrides.iter().map(|(a, v)| format!("{a}: {v}")).collect();
                format!("{value} ({})", per.join(", "))
            }
            Default::Required => "required".to_string(),
            Default::SameAs(other) => format!("= {other}"),
            Default::Optional => "none".to_string(),
        };
        match self.when {
            Some(w) => format!("{base} (only when {} is {})", w.key, quoted_list(w.is)),
            None => base,
        }
    }
}

pub use crate::advantage::gae::{ScorePlacement, Whitening};
pub use crate::advantage::ScaleRewards;
pub use crate::algo::grpo::ImportanceLevel;
pub use crate::algo::grpo_lambda::LengthStd;
pub use crate::algo::loss::LossType;
pub use crate::algo::safe::ValuePosition;
pub use crate::algo::AlgorithmKind;
pub(crate) use crate::choice::quoted_list;
pub use crate::optim::schedule::LrSchedule;
pub use crate::reward::shaping::ShapingKind;

pub struct TableSpec {
    pub name: &'static str,
    /// `[[name]]`: an array of tables.
    pub array: bool,
    /// Off unless present: an absent table resolves to no keys at all (not to its defaults), so it changes neither
    /// the resolved recipe nor its hash. `--set <table>.<key>=...` makes it present.
    pub optional: bool,
    pub doc: &'static str,
}

choice_enum!(
    /// Training and generation dtype.
    DTypeSpec { /// f32 on CPU, bf16 on GPU.
    Auto = "auto", F32 = "f32", Bf16 = "bf16" }
);
choice_enum!(
    /// Where a step's completions come from.
    RolloutSourceKind { Sample = "sample", File = "file" }
);
choice_enum!(
    /// The weights decoding reads.
    RolloutWeights { Model = "model", Bf16 = "bf16" }
);
choice_enum!(
    /// Reward source.
    RewardKind { Rule = "rule", Model = "model", Command = "command", Http = "http" }
);
choice_enum!(
    /// Built-in rule rewards.
    RuleKind { ExactAnswer = "exact_answer", Regex = "regex", Length = "length", Contains = "contains" }
);
choice_enum!(
    /// Where metrics go besides the console (`run.report_to`); metrics.jsonl is always written.
    ReportTo { Jsonl = "jsonl", Tensorboard = "tensorboard" }
);
choice_enum!(
    /// How LoRA adapters start (`lora.init`).
    LoraInit { /// A Kaiming-uniform, B zeros (PEFT's init_lora_weights = true).
    Peft = "peft" }
);

choice_enum!(
    /// What the frozen base's linear weights are held in under LoRA (`lora.base_dtype`).
    LoraBaseDtype { /// As `model.dtype`.
    Model = "model", /// bf16, widened to the activations' dtype one product at a time.
    Bf16 = "bf16" }
);

/// `lora.targets` names: the decoder's linear layers, or PEFT's shorthand for all of them.
pub const LORA_TARGETS: &[&str] =
    &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all-linear"];

choice_enum!(
    /// Built-in datasets (`data.source = "builtin:<name>"`).
    BuiltinData { Arithmetic = "arithmetic", Copy = "copy" }
);

fn non_empty(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err("a non-empty string".into());
    }
    Ok(())
}

fn run_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.contains(['/', '\\']) || s == "." || s == ".." {
        return Err("a non-empty name without `/` or `\\` (it names a directory)".into());
    }
    Ok(())
}

fn device(s: &str) -> Result<(), String> {
    s.parse::<super::DeviceSpec>().map(|_| ())
}

fn data_source(s: &str) -> Result<(), String> {
    match s.strip_prefix("builtin:") {
        Some(name) => BuiltinData::from_name(name).map(|_| ()).ok_or_else(|| {
            format!("a built-in dataset: one of {}", quoted_list_prefixed("builtin:", BuiltinData::NAMES))
        }),
        None if s.ends_with(".jsonl") => Ok(()),
        None => Err(format!(
            "a .jsonl file or a built-in dataset ({})",
            quoted_list_prefixed("builtin:", BuiltinData::NAMES)
        )),
    }
}

fn quoted_list_prefixed(prefix: &str, names: &[&str]) -> String {
    names.iter().map(|n| format!("\"{prefix}{n}\"")).collect::<Vec<_>>().join(", ")
}

fn regex_pattern(s: &str) -> Result<(), String> {
    regex::Regex::new(s).map(|_| ()).map_err(|e| format!("a valid regular expression ({e})"))
}

const INT_MAX: i64 = i64::MAX;
const fn int(min: i64) -> Kind {
    Kind::Int { min, max: INT_MAX }
}
const NON_EMPTY: Kind = Kind::Str { check: Some(non_empty) };

const fn key(path: &'static str, kind: Kind, default: &'static str, doc: &'static str) -> KeySpec {
    KeySpec { path, kind, default: Default::Value(default), when: None, doc }
}

/// A key only the algorithms in `when` read: setting it under another `algorithm.kind` is an error naming them.
const fn scoped(path: &'static str, kind: Kind, default: &'static str, when: When, doc: &'static str) -> KeySpec {
    KeySpec { path, kind, default: Default::Value(default), when: Some(when), doc }
}

/// The algorithms that read each algorithm-specific key (a new algorithm adds its name where it reads the key).
const fn algorithms(is: &'static [&'static str]) -> When {
    When { key: "algorithm.kind", is }
}
/// GRPO's loss and its options (TRL's GRPOConfig keys).
const GRPO_LOSS: When = algorithms(&["grpo", "grpo_lambda"]);
/// The KL coefficient to the frozen reference.
const KL_BETA: When = algorithms(&["grpo", "grpo_lambda", "ppo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]);
/// Per-token KL rewards, epochs of shuffled mini-batches.
const TOKEN_KL: When = algorithms(&["ppo", "reinforce_pp", "reinforce_pp_baseline"]);
/// A discount γ of the returns (REINFORCE++-baseline fixes it at 1).
const DISCOUNT: When = algorithms(&["ppo", "reinforce_pp"]);
const REINFORCE: When = algorithms(&["reinforce_pp", "reinforce_pp_baseline"]);
/// μ updates per batch of rollouts, and dropping truncated completions from the loss.
const REUSE: When = algorithms(&["grpo", "grpo_lambda", "rloo"]);
const RLOO: When = algorithms(&["rloo"]);
/// A trained critic beside the policy.
const CRITIC: When = algorithms(&["ppo", "safe"]);
const PPO: When = algorithms(&["ppo"]);

pub static TABLES: &[TableSpec] = &[
    TableSpec { name: "run", array: false, optional: false, doc: "Naming, length and bookkeeping of the run." },
    TableSpec { name: "model", array: false, optional: false, doc: "The policy model to fine-tune." },
    TableSpec {
        name: "data",
        array: false,
        optional: false,
        doc: "The prompts. Relative paths are resolved from the current directory.",
    },
    TableSpec {
        name: "lora",
        array: false,
        optional: true,
        doc: "LoRA adapters (PEFT's LoraConfig): off unless the table is present. The base weights are frozen (no gradient, no optimizer state); only the adapters train. The KL reference is the base with the adapters off (no second copy of the model) unless model.reference names one. Checkpoints also hold adapter_model.safetensors + adapter_config.json in PEFT's format.",
    },
    TableSpec { name: "rollout", array: false, optional: false, doc: "How completions are produced each step." },
    TableSpec {
        name: "algorithm",
        array: false,
        optional: false,
        doc: "The RL objective. Keys follow the reference implementation's names and defaults (TRL's GRPOConfig, PPOConfig and RLOOConfig, OpenRLHF for REINFORCE++); a key only the algorithms it names read is an error under another kind.",
    },
    TableSpec {
        name: "critic",
        array: false,
        optional: false,
        doc: "The critic of algorithm.kind = \"ppo\" (its value model) and \"safe\" (its heads' learning rate).",
    },
    TableSpec { name: "optim", array: false, optional: false, doc: "AdamW and the learning-rate schedule." },
    TableSpec {
        name: "shaping",
        array: false,
        optional: false,
        doc: "Shaping of the summed reward before advantages (PAR and the baselines of arXiv 2502.18770).",
    },
    TableSpec {
        name: "eval",
        array: false,
        optional: false,
        doc: "Held-out evaluation: before the first step, every eval.every steps and at the end (on when eval.source or eval.split is set). It draws on its own random streams, so it never changes training.",
    },
    TableSpec {
        name: "reward",
        array: true,
        optional: false,
        doc: "One `[[reward]]` table per reward function; the rewards are weighted and summed. At least one.",
    },
];

/// Every recipe key. Order here is the order of the resolved TOML and of the docs.
pub static KEYS: &[KeySpec] = &[
    // [run]
    key("run.name", Kind::Str { check: Some(run_name) }, "\"run\"", "Run name; the run directory is <output_dir>/<name>."),
    key("run.output_dir", NON_EMPTY, "\"runs\"", "Directory that holds run directories."),
    key("run.seed", int(0), "0", "Seed for data order, sampling and anything else random."),
    key(
        "run.max_steps",
        int(1),
        "100",
        "Training steps (each: one batch of rollouts, then algorithm.num_iterations optimizer updates); may change on resume.",
    ),
    key("run.log_every", int(1), "1", "Write a metrics line every this many steps."),
    key("run.save_every", int(0), "50", "Checkpoint every this many steps; 0 = only at the end."),
    key("run.keep_last", int(1), "3", "Number of checkpoints kept, superseded ones (moved aside by a resume from an earlier step) included; older ones are deleted, superseded ones first."),
    key("run.completions_every", int(0), "10", "Write completions/step-<N>.jsonl every this many steps; 0 = never."),
    key(
        "run.max_bad_steps",
        int(0),
        "3",
        "Skip at most this many bad steps in a row (a non-finite reward, loss or grad norm, or a reward source that failed); one more stops the run (exit 1). 0 = stop at the first.",
    ),
    key(
        "run.report_to",
        Kind::ChoiceList(ReportTo::NAMES),
        "[\"jsonl\"]",
        "Where metrics go: metrics.jsonl always (\"jsonl\" may be listed or not); \"tensorboard\" adds TensorBoard event files under <run dir>/tb/, rebuilt from metrics.jsonl at start; may change on resume.",
    ),
    // [model]
    KeySpec {
        path: "model.id",
        kind: NON_EMPTY,
        default: Default::Required,
        when: None,
        doc: "A local directory in HF layout, a .gguf file, or a hub id org/name.",
    },
    key("model.revision", NON_EMPTY, "\"main\"", "Hub revision (branch, tag or commit); ignored for local models."),
    KeySpec {
        path: "model.reference",
        kind: NON_EMPTY,
        default: Default::Optional,
        when: None,
        doc: "The frozen reference model (KL term, PAR's reference completions): a directory, hub id or GGUF with the policy's architecture and vocabulary (TRL ref_model, OpenRLHF --ref_pretrain); unset = the starting policy.",
    },
    key(
        "model.dtype",
        Kind::Choice(DTypeSpec::NAMES),
        "\"auto\"",
        "The models' compute dtype: \"f32\", or \"bf16\" (bf16 weights and activations in forward and backward; a fully fine-tuned model keeps f32 master weights, gradients and AdamW moments, and its checkpoints hold them in f32; log-softmax, log-probs, losses and advantages stay f32; decoding computes in the weights' dtype, or from rollout.weights' copies; on the CPU bf16 matmuls are widened to f32, so it is slower there); \"auto\" = f32 on CPU, bf16 on GPU.",
    ),
    key(
        "model.device",
        Kind::Str { check: Some(device) },
        "\"auto\"",
        "\"auto\", \"cpu\", \"cuda\", \"cuda:N\" or \"metal\"; auto = the first GPU when this build has a GPU backend and a device opens, else the CPU (with a note).",
    ),
    // [lora]
    key("lora.rank", int(1), "8", "Rank r of every adapter (PEFT r); at most the smaller dimension of each targeted layer."),
    key("lora.alpha", Kind::Float(FloatRange::positive()), "8.0", "Scaling numerator α (PEFT lora_alpha): the adapter's output is multiplied by α/r (α/√r with lora.rslora)."),
    key(
        "lora.dropout",
        Kind::Float(FloatRange { min: 0.0, max: 1.0, min_open: false, max_open: true }),
        "0.0",
        "Dropout on the adapters' input (PEFT lora_dropout): in the update's forwards each adapter reads its input with elements zeroed with this probability (the rest scaled by 1/(1 − p)), masks drawn from streams keyed by run.seed, the step and the forward, so resume stays exact; rollouts, stored log-probs and the reference read none.",
    ),
    key(
        "lora.targets",
        Kind::ChoiceList(LORA_TARGETS),
        "[\"q_proj\", \"v_proj\"]",
        "Linear layers that get adapters, by module name (PEFT target_modules), in every decoder layer; [\"all-linear\"] = all seven (the LM head excluded, as PEFT).",
    ),
    key("lora.rslora", Kind::Bool, "false", "Rank-stabilised scaling α/√r instead of α/r (PEFT use_rslora)."),
    key(
        "lora.init",
        Kind::Choice(LoraInit::NAMES),
        "\"peft\"",
        "Initialisation: \"peft\" = PEFT's default, A Kaiming-uniform (bound 1/√in, drawn from run.seed's stream for each layer) and B zeros, so training starts at the base model.",
    ),
    key(
        "lora.base_dtype",
        Kind::Choice(LoraBaseDtype::NAMES),
        "\"model\"",
        "What the frozen base's linear weights are held in: \"model\" = model.dtype, \"bf16\" = bf16 (half the bytes of f32; each product widens one weight at a time, activations, adapters and their AdamW state stay in model.dtype). Embeddings, norms and the LM head stay in model.dtype; checkpoints hold the base as it trained.",
    ),
    // [data]
    KeySpec {
        path: "data.source",
        kind: Kind::Str { check: Some(data_source) },
        default: Default::Required,
        when: None,
        doc: "A .jsonl file (one JSON object per line) or a built-in dataset: \"builtin:arithmetic\" (short arithmetic questions), \"builtin:copy\" (the quickstart's: copy the digit of \"qx7=\").",
    },
    key(
        "data.prompt_field",
        NON_EMPTY,
        "\"prompt\"",
        "Column holding the prompt: a string or a list of {role, content} messages.",
    ),
    key("data.shuffle", Kind::Bool, "true", "Shuffle prompts each epoch (seeded by run.seed)."),
    key("data.max_prompt_tokens", int(1), "256", "Longer prompts are truncated on the left, with a counted warning."),
    key("data.chat", Kind::Bool, "true", "Render prompts with the model's chat template."),
    // [rollout]
    key("rollout.prompts_per_step", int(1), "8", "Distinct prompts per optimizer step."),
    key("rollout.num_generations", int(1), "8", "Completions per prompt (the group size G; ≥ 2 for the algorithms that compare a group's completions)."),
    key("rollout.max_new_tokens", int(1), "64", "Most tokens generated per completion (TRL: max_completion_length)."),
    key("rollout.temperature", Kind::Float(FloatRange::positive()), "1.0", "Sampling temperature; log-probs use it too."),
    key(
        "rollout.top_p",
        Kind::Float(FloatRange { min: 0.0, max: 1.0, min_open: true, max_open: false }),
        "1.0",
        "Nucleus sampling; 1.0 = off.",
    ),
    key("rollout.top_k", int(0), "0", "Sample among the k most likely tokens; 0 = off."),
    key("rollout.min_p", Kind::Float(FloatRange::new(0.0, 1.0)), "0.0", "Drop tokens below min_p × the top probability; 0 = off."),
    key("rollout.repetition_penalty", Kind::Float(FloatRange::positive()), "1.0", "Penalty on already-seen tokens; 1.0 = off."),
    key("rollout.stop", Kind::StrList, "[]", "Stop strings; generation also stops at the model's EOS ids."),
    key(
        "rollout.source",
        Kind::Choice(RolloutSourceKind::NAMES),
        "\"sample\"",
        "\"sample\" from the policy, or replay completions from rollout.file.",
    ),
    KeySpec {
        path: "rollout.file",
        kind: NON_EMPTY,
        default: Default::Required,
        when: Some(When { key: "rollout.source", is: &["file"] }),
        doc: "JSONL of recorded rollouts (prompt, completion, rewards) to train on.",
    },
    key(
        "rollout.batch_size",
        int(0),
        "0",
        "Sequences generated at once; 0 = the largest batch that fits in memory (the memory plan's choice, printed at startup; all completions of a step where memory is unknown, e.g. on a GPU).",
    ),
    key(
        "rollout.weights",
        Kind::Choice(RolloutWeights::NAMES),
        "\"model\"",
        "Weights decoding reads: the policy's own (\"model\": exact on-policy samples), or a bf16 copy refreshed every step (\"bf16\", GRPO with f32 weights: half the bytes per token, on the CPU by our decode kernel, on a GPU by its bf16 matmul; the loss recomputes log-probs in f32 and corrects the mismatch by truncated importance sampling, as TRL does for vLLM rollouts).",
    ),
    KeySpec {
        path: "rollout.importance_cap",
        kind: Kind::Float(FloatRange { min: 1.0, max: f64::INFINITY, min_open: false, max_open: true }),
        default: Default::Value("2.0"),
        when: Some(When { key: "rollout.weights", is: &["bf16"] }),
        doc: "Cap C on each token's importance weight min(π_θ/π_rollout, C) (TRL's vllm_importance_sampling_cap).",
    },
    key(
        "rollout.dynamic_sampling",
        Kind::Bool,
        "false",
        "DAPO's dynamic sampling: drop groups whose rewards are all equal and sample more prompts until the step holds prompts_per_step groups (group algorithms).",
    ),
    KeySpec {
        path: "rollout.max_sampling_rounds",
        kind: int(1),
        default: Default::Value("4"),
        when: Some(When { key: "rollout.dynamic_sampling", is: &["true"] }),
        doc: "Most rounds of prompts_per_step prompts a dynamic-sampling step samples; then it trains on the groups it has, with a warning.",
    },
    // [algorithm]
    key(
        "algorithm.kind",
        Kind::Choice(AlgorithmKind::NAMES),
        "\"grpo\"",
        "grpo (TRL's GRPO), grpo_lambda (arXiv 2505.18086: the top λ fraction of groups by correctness get a length-penalised reward), ppo (a critic and GAE, TRL's PPOTrainer), safe (arXiv 2602.04651: soft-min critic heads, entropy-gated PID-controlled KL penalty), rloo (TRL's RLOOTrainer: leave-one-out baseline, KL in the reward, sequence-level ratio), reinforce_pp (OpenRLHF's REINFORCE++: per-token KL rewards, returns whitened over the batch, no critic) or reinforce_pp_baseline (REINFORCE++ with each group's mean score subtracted first).",
    ),
    KeySpec {
        path: "algorithm.lambda",
        kind: Kind::Float(FloatRange { min: 0.0, max: 1.0, min_open: true, max_open: false }),
        default: Default::Value("0.2"),
        when: Some(When { key: "algorithm.kind", is: &["grpo_lambda"] }),
        doc: "Fraction of the step's groups (ranked by correctness ratio) that get the length-penalised reward; at least one.",
    },
    KeySpec {
        path: "algorithm.alpha",
        kind: Kind::Float(FloatRange::new(0.0, 1.0)),
        default: Default::Value("0.6"),
        when: Some(When { key: "algorithm.kind", is: &["grpo_lambda"] }),
        doc: "Length-penalty strength α: a correct answer earns 1 − α·σ(z) with z its length's z-score among the group's correct answers.",
    },
    KeySpec {
        path: "algorithm.length_std",
        kind: Kind::Choice(LengthStd::NAMES),
        default: Default::Value("\"population\""),
        when: Some(When { key: "algorithm.kind", is: &["grpo_lambda"] }),
        doc: "Std of the correct answers' lengths: population (n) or sample (n − 1).",
    },
    KeySpec {
        path: "algorithm.correctness_reward",
        kind: NON_EMPTY,
        default: Default::Value("\"correct\""),
        when: Some(When { key: "algorithm.kind", is: &["grpo_lambda"] }),
        doc: "The [[reward]] whose raw value decides correctness (the recipe's only reward).",
    },
    KeySpec {
        path: "algorithm.correct_min",
        kind: Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)),
        default: Default::Value("1.0"),
        when: Some(When { key: "algorithm.kind", is: &["grpo_lambda"] }),
        doc: "A completion is correct when the correctness reward is ≥ this.",
    },
    KeySpec {
        path: "algorithm.beta",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::ByAlgorithm {
            value: "0.0",
            overrides: &[("rloo", "0.05"), ("reinforce_pp", "0.01"), ("reinforce_pp_baseline", "0.01")],
        },
        when: Some(KL_BETA),
        doc: "KL coefficient: k3 in GRPO's loss, the initial per-token KL reward of PPO, the sequence k1 reward of RLOO, the per-token KL reward of REINFORCE++; 0 = no reference model.",
    },
    key("algorithm.epsilon", Kind::Float(FloatRange::new(0.0, 1.0)), "0.2", "Lower clipping bound: ratio ≥ 1 − epsilon."),
    KeySpec {
        path: "algorithm.epsilon_high",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::SameAs("algorithm.epsilon"),
        when: None,
        doc: "Upper clipping bound: ratio ≤ 1 + epsilon_high (DAPO suggests 0.28).",
    },
    scoped("algorithm.num_iterations", int(1), "1", REUSE, "Updates per batch of rollouts (μ); > 1 reuses stored old log-probs."),
    scoped("algorithm.loss_type", Kind::Choice(LossType::NAMES), "\"dapo\"", GRPO_LOSS, "Token-loss aggregation, as in TRL."),
    scoped(
        "algorithm.scale_rewards",
        Kind::Choice(ScaleRewards::NAMES),
        "\"group\"",
        GRPO_LOSS,
        "Divide centred rewards by the group std, the batch std, or nothing.",
    ),
    scoped("algorithm.mask_truncated_completions", Kind::Bool, "false", REUSE, "Exclude completions cut at max_new_tokens from the loss."),
    KeySpec {
        path: "algorithm.gradient_checkpointing",
        kind: Kind::Bool,
        default: Default::Value("false"),
        when: Some(GRPO_LOSS),
        doc: "Recompute each layer's forward in backward instead of keeping its activations: far less memory, about a third more update time (TRL's gradient_checkpointing).",
    },
    scoped(
        "algorithm.importance_sampling_level",
        Kind::Choice(ImportanceLevel::NAMES),
        "\"token\"",
        GRPO_LOSS,
        "GSPO: the importance ratio per token (GRPO), per sequence (exp of the mean token log-ratio, clipped whole), or sequence_token (GSPO-token). GSPO's paper uses epsilon = 3e-4, epsilon_high = 4e-4, loss_type = \"grpo\", beta = 0.",
    ),
    scoped(
        "algorithm.use_bias_correction_kl",
        Kind::Bool,
        "true",
        GRPO_LOSS,
        "Multiply k3 by the importance ratio (TRL 1.16's default): same value on-policy, gradient β·(logp − ref).",
    ),
    key(
        "algorithm.micro_batch_size",
        int(0),
        "0",
        "Completions per forward/backward pass (gradients accumulate); 0 = auto, chosen by the trainer.",
    ),
    KeySpec {
        path: "algorithm.gamma",
        kind: Kind::Float(FloatRange::new(0.0, 1.0)),
        default: Default::Value("1.0"),
        when: Some(DISCOUNT),
        doc: "GAE discount γ.",
    },
    KeySpec {
        path: "algorithm.lam",
        kind: Kind::Float(FloatRange::new(0.0, 1.0)),
        default: Default::Value("0.95"),
        when: Some(PPO),
        doc: "GAE λ.",
    },
    KeySpec {
        path: "algorithm.ppo_epochs",
        kind: int(1),
        default: Default::ByAlgorithm { value: "4", overrides: &[("reinforce_pp", "1"), ("reinforce_pp_baseline", "1")] },
        when: Some(TOKEN_KL),
        doc: "Passes over each step's rollouts (TRL num_ppo_epochs; OpenRLHF max_epochs for REINFORCE++).",
    },
    KeySpec {
        path: "algorithm.num_mini_batches",
        kind: int(1),
        default: Default::Value("1"),
        when: Some(TOKEN_KL),
        doc: "Optimizer steps per epoch, over shuffled mini-batches (divides the step's completions).",
    },
    KeySpec {
        path: "algorithm.vf_coef",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.1"),
        when: Some(PPO),
        doc: "Weight of the value loss.",
    },
    KeySpec {
        path: "algorithm.value_clip",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("0.2"),
        when: Some(CRITIC),
        doc: "Value clipping: V_clip = V_old + clip(V − V_old, ±value_clip) (TRL cliprange_value).",
    },
    KeySpec {
        path: "algorithm.kl_estimator",
        kind: Kind::Choice(&["k1", "k2", "k3"]),
        default: Default::Value("\"k1\""),
        when: Some(TOKEN_KL),
        doc: "Per-token KL in the reward: k1 = logp − ref (TRL, OpenRLHF default), k2 = (logp − ref)²/2, or k3.",
    },
    KeySpec {
        path: "algorithm.whiten",
        kind: Kind::Choice(Whitening::NAMES),
        default: Default::Value("\"unbiased\""),
        when: Some(PPO),
        doc: "Advantage whitening over the step's tokens: unbiased variance (TRL), population (OpenRLHF), or none.",
    },
    KeySpec {
        path: "algorithm.score_placement",
        kind: Kind::Choice(ScorePlacement::NAMES),
        default: Default::Value("\"last_token\""),
        when: Some(PPO),
        doc: "Where the score joins the per-token rewards: the last real token (OpenRLHF) or one past it (TRL's trl_p1).",
    },
    KeySpec {
        path: "algorithm.missing_eos_penalty",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Optional,
        when: Some(PPO),
        doc: "Subtracted from the score of a completion without EOS (truncated or stopped by a stop string).",
    },
    KeySpec {
        path: "algorithm.kl_target",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Optional,
        when: Some(PPO),
        doc: "Adaptive KL: steer β so the mean per-token KL approaches this (Ziegler et al.); unset = fixed β.",
    },
    KeySpec {
        path: "algorithm.kl_horizon",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("10000.0"),
        when: Some(PPO),
        doc: "Adaptive KL horizon: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon), n the step's completions.",
    },
    KeySpec {
        path: "algorithm.safe.alpha_softmin",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("0.3"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Soft-min temperature α of the two critic heads: V = −α·log(½(e^(−V1/α) + e^(−V2/α))).",
    },
    KeySpec {
        path: "algorithm.safe.epochs",
        kind: int(1),
        default: Default::Value("2"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Passes over the whole batch per step (the controller is called once per pass).",
    },
    KeySpec {
        path: "algorithm.safe.huber_delta",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("0.5"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Huber δ of the value loss ½·[Huber(V − r̃) + Huber(V_clip − r̃)].",
    },
    KeySpec {
        path: "algorithm.safe.value_weight",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.5"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Weight of the value loss in the total loss.",
    },
    KeySpec {
        path: "algorithm.safe.entropy_coef",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.01"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Entropy bonus c_H (mean entropy over all completion positions).",
    },
    KeySpec {
        path: "algorithm.safe.heads_max_grad_norm",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.5"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Clip the critic heads' gradient norm (the policy's is optim.max_grad_norm); 0 = off.",
    },
    KeySpec {
        path: "algorithm.safe.kl_penalty_grad",
        kind: Kind::Bool,
        default: Default::Value("true"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "The KL penalty acts on the policy through a differentiable KL (safe's choice); false = the official code's constant penalty.",
    },
    KeySpec {
        path: "algorithm.safe.value_position",
        kind: Kind::Choice(ValuePosition::NAMES),
        default: Default::Value("\"last_valid\""),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Where the critic reads the hidden state: the last real token, or the last padded column (official).",
    },
    KeySpec {
        path: "algorithm.safe.kl_base_threshold",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.3"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "τ_base of the KL threshold τ = clamp((τ_base + PID)·φ).",
    },
    KeySpec {
        path: "algorithm.safe.entropy_floor",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("2.0"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "H_floor (nats) of the entropy gate g = max(gate_floor, H_floor/(H̄ + entropy_offset)).",
    },
    KeySpec {
        path: "algorithm.safe.penalty_coef",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.1"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "P = penalty_coef·g·(k_s − τ)² while the short KL EMA k_s exceeds τ.",
    },
    KeySpec {
        path: "algorithm.safe.kl_ema_short",
        kind: Kind::Float(FloatRange::new(0.0, 1.0)),
        default: Default::Value("0.9"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "EMA rate of the short KL tracker k_s (the one compared with τ).",
    },
    KeySpec {
        path: "algorithm.safe.kl_ema_long",
        kind: Kind::Float(FloatRange::new(0.0, 1.0)),
        default: Default::Value("0.99"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "EMA rate of the long KL tracker (logged).",
    },
    KeySpec {
        path: "algorithm.safe.threshold_min",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.1"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Lower clamp of τ.",
    },
    KeySpec {
        path: "algorithm.safe.threshold_max",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.6"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Upper clamp of τ.",
    },
    KeySpec {
        path: "algorithm.safe.entropy_offset",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.1"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Offset in the entropy gate's denominator.",
    },
    KeySpec {
        path: "algorithm.safe.gate_floor",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.5"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Smallest entropy gate.",
    },
    KeySpec {
        path: "algorithm.safe.pid_kp",
        kind: Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)),
        default: Default::Value("0.3"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "PID proportional gain on the reward-velocity error.",
    },
    KeySpec {
        path: "algorithm.safe.pid_ki",
        kind: Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)),
        default: Default::Value("0.01"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "PID integral gain.",
    },
    KeySpec {
        path: "algorithm.safe.pid_kd",
        kind: Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)),
        default: Default::Value("0.05"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "PID derivative gain.",
    },
    KeySpec {
        path: "algorithm.safe.reward_ema",
        kind: Kind::Float(FloatRange::new(0.0, 1.0)),
        default: Default::Value("0.95"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "EMA rate of the mean reward whose change is the reward velocity.",
    },
    KeySpec {
        path: "algorithm.safe.target_velocity",
        kind: Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)),
        default: Default::Value("0.001"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Reward velocity the PID aims for.",
    },
    KeySpec {
        path: "algorithm.safe.integral_clamp",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("1.0"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "The PID integral is clamped to ±this.",
    },
    KeySpec {
        path: "algorithm.safe.phase_window",
        kind: int(1),
        default: Default::Value("50"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Phase detector window (controller calls; two per step at epochs = 2).",
    },
    KeySpec {
        path: "algorithm.safe.climb_margin",
        kind: Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)),
        default: Default::Value("0.01"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Climbing when the recent window's mean reward beats the previous one's by this (raw-reward units).",
    },
    KeySpec {
        path: "algorithm.safe.converge_std",
        kind: Kind::Float(FloatRange::non_negative()),
        default: Default::Value("0.02"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Converged when the recent rewards' std is below this and their mean above converge_min.",
    },
    KeySpec {
        path: "algorithm.safe.converge_min",
        kind: Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)),
        default: Default::Value("0.7"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "See converge_std (raw-reward units).",
    },
    KeySpec {
        path: "algorithm.safe.phi_warmup",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("1.5"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Threshold multiplier φ while warming up.",
    },
    KeySpec {
        path: "algorithm.safe.phi_climbing",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("1.2"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "φ while the reward climbs.",
    },
    KeySpec {
        path: "algorithm.safe.phi_plateau",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("0.8"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "φ on a plateau.",
    },
    KeySpec {
        path: "algorithm.safe.phi_converged",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("1.0"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "φ once converged.",
    },
    KeySpec {
        path: "algorithm.safe.reward_norm_eps",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("1e-8"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Reward normaliser: r̃ = (r − μ)/(√v + eps).",
    },
    KeySpec {
        path: "algorithm.safe.reward_norm_init_count",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("1e-4"),
        when: Some(When { key: "algorithm.kind", is: &["safe"] }),
        doc: "Reward normaliser's initial count (mean 0, variance 1).",
    },
    scoped(
        "algorithm.normalize_advantages",
        Kind::Bool,
        "false",
        RLOO,
        "Whiten the leave-one-out advantages over the step: (A − mean)/(std + 1e-4) (TRL RLOOConfig).",
    ),
    scoped(
        "algorithm.reward_clip",
        Kind::Float(FloatRange::positive()),
        "10.0",
        REINFORCE,
        "Scores are clipped to ±this after the baseline (OpenRLHF reward.clip_range).",
    ),
    // [critic]
    scoped(
        "critic.init",
        NON_EMPTY,
        "\"policy\"",
        PPO,
        "ppo's value model: \"policy\" (the starting policy's weights, a zero value head), \"reward_model\" (the [[reward]] of kind model), or a path/hub id.",
    ),
    scoped(
        "critic.lora",
        Kind::Bool,
        "false",
        PPO,
        "ppo's value model trains LoRA adapters (the [lora] table's rank, alpha, targets and rslora; A from its own seeded streams) and its value head on a frozen backbone, which with critic.init = \"policy\" is the policy's own base weights (no second copy); needs [lora].",
    ),
    scoped("critic.lr", Kind::Float(FloatRange::new(0.0, 1.0)), "1e-5", CRITIC, "Value model learning rate (AdamW, same betas, eps and schedule as the policy)."),
    scoped("critic.max_grad_norm", Kind::Float(FloatRange::non_negative()), "1.0", PPO, "Clip the value model's gradient norm; 0 = off."),
    // [optim]
    key("optim.lr", Kind::Float(FloatRange::new(0.0, 1.0)), "1e-6", "Peak learning rate."),
    key(
        "optim.betas",
        Kind::FloatPair(FloatRange { min: 0.0, max: 1.0, min_open: false, max_open: true }),
        "[0.9, 0.999]",
        "AdamW β1, β2.",
    ),
    key("optim.eps", Kind::Float(FloatRange::positive()), "1e-8", "AdamW ε."),
    key("optim.weight_decay", Kind::Float(FloatRange::non_negative()), "0.0", "Decoupled weight decay."),
    key("optim.max_grad_norm", Kind::Float(FloatRange::non_negative()), "1.0", "Clip the global gradient norm to this; 0 = no clipping."),
    key("optim.schedule", Kind::Choice(LrSchedule::NAMES), "\"linear\"", "Learning-rate schedule after warm-up (TRL's default: linear decay to 0 at run.max_steps)."),
    key("optim.warmup_steps", int(0), "0", "Linear warm-up from 0 over this many steps."),
    // [shaping]
    key(
        "shaping.kind",
        Kind::Choice(ShapingKind::NAMES),
        "\"none\"",
        "par = mean σ(k·(r − r_ref)) over reference rewards (PAR); centered, sgfc, lsc also use references; meanstd, clip, minmax keep running statistics; sigmoid, tanh, fitted_poly map r (or r − r_ref when relative).",
    ),
    key("shaping.relative", Kind::Bool, "false", "sigmoid, tanh, fitted_poly: apply to r − r_ref averaged over references instead of r."),
    key("shaping.k", Kind::Float(FloatRange::positive()), "1.0", "Sigmoid slope k (par, sgfc, sigmoid)."),
    key(
        "shaping.max_refs",
        int(1),
        "1",
        "References per prompt (M): completions of the frozen starting policy, scored by the same rewards, made once per prompt and kept in checkpoints.",
    ),
    KeySpec {
        path: "shaping.ceil",
        kind: Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)),
        default: Default::Optional,
        when: None,
        doc: "Cap the reward at this value (before and after the standardising kinds).",
    },
    KeySpec {
        path: "shaping.length_penalty.threshold",
        kind: int(0),
        default: Default::Optional,
        when: None,
        doc: "Subtract length_penalty.per_token per completion token beyond this many (references too).",
    },
    key("shaping.length_penalty.per_token", Kind::Float(FloatRange::non_negative()), "0.01", "Penalty per token beyond length_penalty.threshold."),
    // [eval]
    KeySpec {
        path: "eval.source",
        kind: Kind::Str { check: Some(data_source) },
        default: Default::Optional,
        when: None,
        doc: "Held-out prompts: a .jsonl file (read with data.prompt_field) or a built-in dataset, as data.source.",
    },
    key(
        "eval.split",
        Kind::Float(FloatRange { min: 0.0, max: 1.0, min_open: false, max_open: true }),
        "0.0",
        "Instead of eval.source: hold out this fraction of data.source's rows (a fixed selection, the same for every run.seed); training never sees them.",
    ),
    key("eval.every", int(0), "0", "Evaluate every this many steps, besides before the first step and at the end; 0 = only those two."),
    key("eval.num_samples", int(1), "1", "Completions per prompt (k of pass@k); more than 1 needs eval.temperature > 0."),
    key("eval.temperature", Kind::Float(FloatRange::non_negative()), "0.0", "Sampling temperature of evaluation; 0 = greedy. top_p, top_k, min_p, repetition_penalty and stop are rollout's."),
    key("eval.max_new_tokens", int(0), "0", "Most tokens per evaluation completion; 0 = rollout.max_new_tokens."),
    key("eval.max_prompts", int(0), "0", "Evaluate only the first this many held-out prompts; 0 = all."),
    KeySpec {
        path: "eval.reward",
        kind: NON_EMPTY,
        default: Default::Optional,
        when: None,
        doc: "Score evaluation by this reward's raw value alone; unset = the recipe's weighted sum of rewards (unshaped).",
    },
    key("eval.pass_threshold", Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)), "1.0", "A completion passes (for pass@k) when its evaluation score is at least this."),
    // [[reward]]
    KeySpec {
        path: "reward.name",
        kind: NON_EMPTY,
        default: Default::Required,
        when: None,
        doc: "Unique name; metrics are rewards/<name>/mean.",
    },
    key("reward.kind", Kind::Choice(RewardKind::NAMES), "\"rule\"", "Reward source."),
    key("reward.weight", Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)), "1.0", "Weight in the summed reward."),
    KeySpec {
        path: "reward.rule",
        kind: Kind::Choice(RuleKind::NAMES),
        default: Default::Required,
        when: Some(When { key: "reward.kind", is: &["rule"] }),
        doc: "exact_answer: last number = the data's answer; regex: format match; length: near target; contains: has text.",
    },
    KeySpec {
        path: "reward.field",
        kind: NON_EMPTY,
        default: Default::Value("\"answer\""),
        when: Some(When { key: "reward.rule", is: &["exact_answer"] }),
        doc: "Data column exact_answer compares with.",
    },
    KeySpec {
        path: "reward.pattern",
        kind: Kind::Str { check: Some(regex_pattern) },
        default: Default::Required,
        when: Some(When { key: "reward.rule", is: &["regex"] }),
        doc: "Regular expression the completion must match (regex crate syntax).",
    },
    KeySpec {
        path: "reward.target",
        kind: int(1),
        default: Default::Required,
        when: Some(When { key: "reward.rule", is: &["length"] }),
        doc: "Target completion length in tokens.",
    },
    KeySpec {
        path: "reward.model",
        kind: NON_EMPTY,
        default: Default::Required,
        when: Some(When { key: "reward.kind", is: &["model"] }),
        doc: "A sequence-classification reward model (*ForSequenceClassification, one label): a local HF directory or a hub id.",
    },
    KeySpec {
        path: "reward.chat",
        kind: Kind::Bool,
        default: Default::Value("false"),
        when: Some(When { key: "reward.kind", is: &["model"] }),
        doc: "Score the conversation rendered with the reward model's chat template (else the prompt text + completion).",
    },
    KeySpec {
        path: "reward.batch_size",
        kind: int(1),
        default: Default::Value("16"),
        when: Some(When { key: "reward.kind", is: &["model"] }),
        doc: "Sequences per reward-model forward.",
    },
    KeySpec {
        path: "reward.command",
        kind: Kind::StrList,
        default: Default::Required,
        when: Some(When { key: "reward.kind", is: &["command"] }),
        doc: "Program and arguments, e.g. [\"python3\", \"score.py\"]: started once, sent one JSON line per batch ({prompts, completions, completion_ids, finish_reasons, <columns>}), answers {\"rewards\": [...]}.",
    },
    KeySpec {
        path: "reward.urls",
        kind: Kind::StrList,
        default: Default::Required,
        when: Some(When { key: "reward.kind", is: &["http"] }),
        doc: "Reward servers (OpenRLHF protocol: POST {query, prompts, labels} → {rewards}); the batch is split across them.",
    },
    KeySpec {
        path: "reward.label_field",
        kind: NON_EMPTY,
        default: Default::Value("\"answer\""),
        when: Some(When { key: "reward.kind", is: &["http"] }),
        doc: "Data column sent as `labels`.",
    },
    KeySpec {
        path: "reward.timeout",
        kind: Kind::Float(FloatRange::positive()),
        default: Default::Value("60.0"),
        when: Some(When { key: "reward.kind", is: &["command", "http"] }),
        doc: "Seconds to wait for an answer; then the batch is sent again (a command is restarted first).",
    },
    KeySpec {
        path: "reward.max_retries",
        kind: int(0),
        default: Default::Value("2"),
        when: Some(When { key: "reward.kind", is: &["command", "http"] }),
        doc: "Retries of a batch (after a timeout, a crash, HTTP 429/5xx or an invalid answer) before the step is skipped.",
    },
    KeySpec {
        path: "reward.gate.on",
        kind: NON_EMPTY,
        default: Default::Optional,
        when: None,
        doc: "G-RA gate: count this reward only where the named reward's raw value is ≥ gate.min (else it adds 0). Write gate = { on = \"correct\", min = 1.0 }.",
    },
    KeySpec {
        path: "reward.gate.min",
        kind: Kind::Float(FloatRange::new(f64::NEG_INFINITY, f64::INFINITY)),
        default: Default::Optional,
        when: None,
        doc: "G-RA gate threshold δ (compared with ≥); required with gate.on.",
    },
    KeySpec {
        path: "reward.text",
        kind: NON_EMPTY,
        default: Default::Required,
        when: Some(When { key: "reward.rule", is: &["contains"] }),
        doc: "Text the completion must contain.",
    },
];

/// Keys that may differ between a checkpoint's recipe and the recipe it resumes with.
pub const RESUMABLE_KEYS: &[&str] = &[
    "run.max_steps",
    "run.log_every",
    "run.save_every",
    "run.keep_last",
    "run.completions_every",
    "run.max_bad_steps",
    "run.report_to",
    // Evaluation never changes training (eval.split does: it picks the training rows).
    "eval.source",
    "eval.every",
    "eval.num_samples",
    "eval.temperature",
    "eval.max_new_tokens",
    "eval.max_prompts",
    "eval.reward",
    "eval.pass_threshold",
];

pub fn spec(path: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.path == path)
}

pub fn table(name: &str) -> Option<&'static TableSpec> {
    TABLES.iter().find(|t| t.name == name)
}

pub fn keys_of(table: &str) -> impl Iterator<Item = &'static KeySpec> + '_ {
    KEYS.iter().filter(move |k| k.table() == table)
}
