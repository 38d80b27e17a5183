//! RL algorithms behind one boundary ([`boundary::Algorithm`]), each readable top to bottom in its own file, built
//! from the same shared pieces ([`loss`]: KL estimators, the clipped surrogate, aggregation; [`critic`]: a trained
//! critic with its optimizer; [`crate::advantage`]: group advantages, GAE, whitening).
//!
//! # Adding an algorithm
//!
//! A new algorithm is one file here plus its registration in this file. The file provides:
//!
//! 1. **Settings**: a `…Settings` struct with every hyperparameter, built once by `fn from_keys(k: &dyn Keys)` from
//!    its recipe keys (TRL's names where TRL has the key), with `impl Default` equal to the schema's defaults
//!    (tests/recipe.rs checks that for every algorithm). Its keys go in `recipe/schema.rs` with
//!    `when: algorithm.kind is [...]` naming every algorithm that reads them: a key the chosen algorithm does not
//!    read is then an error naming the key and its algorithms.
//! 2. **Needs**: `fn needs(&self) -> Needs` (reference model, value model, entropy gradient, groups, ...): the
//!    trainer loads what is asked and the memory plan counts it. Checks of its keys against the rest of the recipe
//!    go in `fn problems(&self, shape: &RecipeShape) -> Vec<Problem>`.
//! 3. **The algorithm**: a struct implementing [`Algorithm`], built by `fn new(settings, setup: &Setup)`: its
//!    advantages, its whole update step (optimizer steps, metrics), and its persistent state (`state`,
//!    `tensor_files`, `restore`), which checkpoints save and resume restores bit for bit.
//!
//! Registration: a variant of [`AlgorithmKind`] (its recipe name), of [`Settings`], and one arm in each `match` of
//! this file. Nothing in `train/` or `recipe/validate.rs` names an algorithm.

pub mod batching;
pub mod boundary;
pub mod critic;
pub mod grpo;
pub mod grpo_lambda;
pub mod loss;
pub mod ppo;
pub mod reinforce;
pub mod rloo;
pub mod safe;

use anyhow::Result;

pub use boundary::{Algorithm, Models, Needs, OptimSchedule, Runtime, StepBatch, StepOutcome};

choice_enum!(
    /// The RL algorithm (`algorithm.kind`).
    AlgorithmKind { Grpo = "grpo", GrpoLambda = "grpo_lambda", Ppo = "ppo", Safe = "safe", Rloo = "rloo",
        ReinforcePp = "reinforce_pp", ReinforcePpBaseline = "reinforce_pp_baseline" }
);

/// An algorithm's view of the validated recipe keys it reads, by full path (`algorithm.epsilon`, `critic.lr`). The
/// recipe implements it over its checked tables: every key asked for applies, is set (or defaulted) and has its
/// schema's type, so these never fail.
pub trait Keys {
    fn float(&self, path: &str) -> f64;
    fn int(&self, path: &str) -> i64;
    fn boolean(&self, path: &str) -> bool;
    fn string(&self, path: &str) -> String;
    /// Whether an optional key (no default) is set.
    fn is_set(&self, path: &str) -> bool;
}

impl dyn Keys + '_ {
    pub fn usize(&self, path: &str) -> usize {
        self.int(path) as usize // the schema's ranges keep integer keys ≥ 0
    }
    pub fn opt_float(&self, path: &str) -> Option<f64> {
        self.is_set(path).then(|| self.float(path))
    }
    pub fn choice<T>(&self, path: &str, from: fn(&str) -> Option<T>) -> T {
        from(&self.string(path)).unwrap_or_else(|| unreachable!("`{path}` is checked against its enum's names"))
    }
}

/// The shape of the recipe an algorithm's settings are checked against.
pub struct RecipeShape<'a> {
    pub prompts_per_step: usize,
    pub num_generations: usize,
    /// The `[[reward]]` names and whether each is a reward model.
    pub rewards: &'a [(String, bool)],
    /// Whether `[shaping]` changes the reward.
    pub shaping: bool,
}

impl RecipeShape<'_> {
    pub fn completions_per_step(&self) -> usize {
        self.prompts_per_step * self.num_generations
    }
}

/// A problem with the recipe found by an algorithm: the key it is about (for the line number), the `[[reward]]`
/// entry when it is a reward key, and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub key: &'static str,
    /// Index into the recipe's rewards, for a `reward.*` key.
    pub reward: Option<usize>,
    pub message: String,
}

impl Problem {
    pub fn at(key: &'static str, message: impl Into<String>) -> Self {
        Self { key, reward: None, message: message.into() }
    }
    pub fn at_reward(index: usize, key: &'static str, message: impl Into<String>) -> Self {
        Self { key, reward: Some(index), message: message.into() }
    }
}

/// What [`build`] needs besides the settings.
pub struct Setup<'a> {
    pub device: &'a candle_core::Device,
    pub dtype: candle_core::DType,
    /// The policy's config (critic heads sit on its hidden size; a value model must share its vocabulary).
    pub policy: &'a crate::model::ModelConfig,
    /// Where the starting policy came from (PPO's value model starts from it by default).
    pub policy_source: &'a crate::model::ModelSource,
    /// The id of the recipe's first reward model, if any (`critic.init = "reward_model"`).
    pub reward_model: Option<&'a str>,
    /// `run.seed`: initialises any new weights.
    pub seed: u64,
    /// The policy's AdamW settings: a critic's optimizer shares its betas, eps and weight decay.
    pub optim: crate::optim::AdamWConfig,
    /// The policy itself: with LoRA, its frozen base is what a LoRA value model of `critic.init = "policy"` sits
    /// on (shared, not copied).
    pub policy_model: &'a crate::model::CausalLm,
}

/// Every algorithm's settings: one variant per algorithm.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // built once per run
pub enum Settings {
    Grpo(grpo::GrpoSettings),
    GrpoLambda(grpo_lambda::GrpoLambdaSettings),
    Ppo(ppo::PpoSettings),
    Safe(safe::SafeSettings),
    Rloo(rloo::RlooSettings),
    /// `reinforce_pp` and `reinforce_pp_baseline` (its `baseline` flag).
    Reinforce(reinforce::ReinforceSettings),
}

impl Settings {
    /// The settings of `kind` from its keys.
    pub fn from_keys(kind: AlgorithmKind, k: &dyn Keys) -> Self {
        match kind {
            AlgorithmKind::Grpo => Settings::Grpo(grpo::GrpoSettings::from_keys(k)),
            AlgorithmKind::GrpoLambda => Settings::GrpoLambda(grpo_lambda::GrpoLambdaSettings::from_keys(k)),
            AlgorithmKind::Ppo => Settings::Ppo(ppo::PpoSettings::from_keys(k)),
            AlgorithmKind::Safe => Settings::Safe(safe::SafeSettings::from_keys(k)),
            AlgorithmKind::Rloo => Settings::Rloo(rloo::RlooSettings::from_keys(k)),
            AlgorithmKind::ReinforcePp => Settings::Reinforce(reinforce::ReinforceSettings::from_keys(k, false)),
            AlgorithmKind::ReinforcePpBaseline => Settings::Reinforce(reinforce::ReinforceSettings::from_keys(k, true)),
        }
    }

    /// The default settings of `kind` (the schema's defaults; a test checks they agree).
    pub fn default_of(kind: AlgorithmKind) -> Self {
        match kind {
            AlgorithmKind::Grpo => Settings::Grpo(Default::default()),
            AlgorithmKind::GrpoLambda => Settings::GrpoLambda(Default::default()),
            AlgorithmKind::Ppo => Settings::Ppo(Default::default()),
            AlgorithmKind::Safe => Settings::Safe(Default::default()),
            AlgorithmKind::Rloo => Settings::Rloo(Default::default()),
            AlgorithmKind::ReinforcePp => Settings::Reinforce(reinforce::ReinforceSettings::default_for(false)),
            AlgorithmKind::ReinforcePpBaseline => Settings::Reinforce(reinforce::ReinforceSettings::default_for(true)),
        }
    }

    pub fn needs(&self) -> Needs {
        match self {
            Settings::Grpo(p) => p.needs(),
            Settings::GrpoLambda(p) => p.needs(),
            Settings::Ppo(p) => p.needs(),
            Settings::Safe(p) => p.needs(),
            Settings::Rloo(p) => p.needs(),
            Settings::Reinforce(p) => p.needs(),
        }
    }

    /// The settings that matter most, in one line (`safe train`'s summary).
    pub fn summary(&self) -> String {
        match self {
            Settings::Grpo(p) => p.summary(),
            Settings::GrpoLambda(p) => p.summary(),
            Settings::Ppo(p) => p.summary(),
            Settings::Safe(p) => p.summary(),
            Settings::Rloo(p) => p.summary(),
            Settings::Reinforce(p) => p.summary(),
        }
    }

    /// The algorithm's own checks of the recipe (beyond each key's type and range).
    pub fn problems(&self, shape: &RecipeShape) -> Vec<Problem> {
        match self {
            Settings::Grpo(p) => p.problems(shape),
            Settings::GrpoLambda(p) => p.problems(shape),
            Settings::Ppo(p) => p.problems(shape),
            Settings::Safe(p) => p.problems(shape),
            Settings::Rloo(p) => p.problems(shape),
            Settings::Reinforce(p) => p.problems(shape),
        }
    }
}

/// Build the algorithm once, before the first step (loading its own models, e.g. PPO's value model).
pub fn build(settings: &Settings, setup: &Setup) -> Result<Box<dyn Algorithm>> {
    Ok(match settings {
        Settings::Grpo(p) => Box::new(grpo::Grpo::new(p.clone())),
        Settings::GrpoLambda(p) => Box::new(grpo_lambda::GrpoLambda::new(p.clone())),
        Settings::Ppo(p) => Box::new(ppo::Ppo::new(p.clone(), setup)?),
        Settings::Safe(p) => Box::new(safe::Safe::new(p.clone(), setup)?),
        Settings::Rloo(p) => Box::new(rloo::Rloo::new(p.clone())),
        Settings::Reinforce(p) => Box::new(reinforce::Reinforce::new(p.clone())),
    })
}
