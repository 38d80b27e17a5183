//! The command line: argument types (clap derive) and dispatch. `main.rs` only parses and maps the exit code.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::exit::{self, Failure, OrExit};
use crate::recipe::{self, DTypeSpec, DeviceSpec, Recipe, RewardSource, RolloutSource, Rule};
use crate::report;
pub use crate::train::run_dir::Resume;
use crate::train::status::Status;

mod eval;
mod generate;
mod logprobs;
mod output;

const ABOUT: &str =
    "Fine-tune Hugging Face causal language models with reinforcement learning (GRPO, PPO, SAFE, RLOO, REINFORCE++), on Candle.";

const LONG_ABOUT: &str = "\
Fine-tune Hugging Face causal language models with reinforcement learning (GRPO, GSPO, GRPO-λ, PPO, SAFE,
RLOO, REINFORCE++), on Candle.

A run is described by a TOML recipe: the model, the prompts, how completions are sampled, the algorithm,
the optimizer and the rewards. Start from configs/example.toml; `safe check --explain` lists every key.

Examples:
  safe check --config configs/example.toml
  safe train --config configs/example.toml --set rollout.max_new_tokens=128
  safe generate --model ../shared/fixtures/tiny/tiny-llama --prompt 'Hello' --max-new-tokens 16
  safe export runs/lora --merge merged/
  safe runs runs/
  safe report runs/quickstart";

#[derive(Parser, Debug)]
#[command(name = "safe", version, about = ABOUT, long_about = LONG_ABOUT, after_help = exit::HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    Train(TrainArgs),
    Eval(EvalArgs),
    Check(CheckArgs),
    Generate(GenerateArgs),
    Logprobs(LogprobsArgs),
    Export(ExportArgs),
    Runs(RunsArgs),
    Report(ReportArgs),
}

/// Train a model as a recipe describes.
#[derive(Args, Debug)]
#[command(
    about = "Train a model as a recipe describes",
    long_about = "\
Train a model as a recipe describes, writing metrics, completions and checkpoints to <run.output_dir>/<run.name>/.

The recipe is validated completely before anything is loaded; any problem is reported with its file and line
and the exit code is 2.

Example:
  safe train --config configs/example.toml --set run.max_steps=20 --set optim.lr=2e-6",
    after_help = exit::HELP
)]
pub struct TrainArgs {
    /// The recipe (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Override a recipe key, e.g. `--set rollout.max_new_tokens=128`, `--set model.id=/models/x`,
    /// `--set reward.0.weight=2`. Repeatable; applied before validation.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// `auto`: continue from the newest complete checkpoint of the run, if any; `never`: start fresh (refuses a
    /// non-empty run directory); or a checkpoint directory to resume from.
    #[arg(long, value_name = "auto|DIR|never", default_value = "auto")]
    pub resume: Resume,
    /// With `--resume never`: delete an existing run directory (checkpoints included) and start over.
    #[arg(long)]
    pub overwrite: bool,
}

/// Evaluate a model or checkpoint on a recipe's held-out prompts.
#[derive(Args, Debug)]
#[command(
    about = "Evaluate a model or checkpoint on a recipe's held-out prompts, as training does",
    long_about = "\
Evaluate a model or a checkpoint on the held-out prompts of a recipe's [eval] table (eval.source, or the rows
eval.split holds out of data.source; data.source whole when the recipe names neither), with the recipe's
rewards, eval.num_samples completions per prompt at eval.temperature: the same prompts, random streams and
metrics (eval/reward, eval/<name>/mean, eval/pass@k, eval/mean_length) as the evaluation during training.

Examples:
  safe eval --config configs/quickstart.toml --model runs/quickstart/checkpoints/step-300
  safe eval --config recipe.toml --model Qwen/Qwen2.5-0.5B-Instruct --set eval.num_samples=8 \\
      --set eval.temperature=1.0 --json --output eval.jsonl",
    after_help = exit::HELP
)]
pub struct EvalArgs {
    /// The recipe (TOML): its [eval], [data], [[reward]], rollout sampling keys and model device/dtype.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Override a recipe key, e.g. `--set eval.num_samples=8`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// The model: a local HF directory, a checkpoint directory, a .gguf file or a hub id; default: model.id.
    #[arg(long, value_name = "M")]
    pub model: Option<String>,
    /// Sequences generated at once.
    #[arg(long, value_name = "B", default_value_t = 16, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Write every evaluated completion (prompt, completion, rewards, score, passed) here as JSONL.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print the metrics as one JSON object instead of a line for people.
    #[arg(long)]
    pub json: bool,
}

/// Validate a recipe and print it fully resolved.
#[derive(Args, Debug)]
#[command(
    about = "Validate a recipe and print it fully resolved, or document every recipe key",
    long_about = "\
Validate a recipe and print it fully resolved (every key, defaults included) as TOML on stdout.
Exit code 0 when the recipe is valid, 2 (with every problem, by file and line) when not.

With --explain, print every recipe key with its type, default and meaning instead (no --config needed).

Examples:
  safe check --config configs/example.toml
  safe check --config configs/example.toml --set algorithm.loss_type=grpo
  safe check --explain",
    after_help = exit::HELP
)]
pub struct CheckArgs {
    /// The recipe (TOML).
    #[arg(long, short = 'c', value_name = "FILE", required_unless_present = "explain")]
    pub config: Option<PathBuf>,
    /// Override a recipe key, e.g. `--set rollout.max_new_tokens=128`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print every recipe key: path, type, default and a one-line description.
    #[arg(long)]
    pub explain: bool,
    /// With --explain: Markdown (the text of docs/recipe.md).
    #[arg(long, requires = "explain")]
    pub markdown: bool,
}

/// Sample completions from a model.
#[derive(Args, Debug, Clone)]
#[command(
    about = "Sample completions from a model (batched)",
    long_about = "\
Sample completions from a model: a local directory in Hugging Face layout, a .gguf file, or a hub id.
Prompts come from --prompt or from a JSONL file with a `prompt` field (a string or chat messages).

Examples:
  safe generate --model ../shared/fixtures/tiny/tiny-llama --prompt 'Once upon a time' --max-new-tokens 32
  safe generate --model HuggingFaceTB/SmolLM2-135M-Instruct --input prompts.jsonl --chat --temperature 0 \\
      --format jsonl --output out.jsonl",
    after_help = exit::HELP,
    group(ArgGroup::new("prompts").required(true).args(["prompt", "input"]))
)]
pub struct GenerateArgs {
    /// Local HF directory, .gguf file, or hub id org/name.
    #[arg(long, value_name = "M")]
    pub model: String,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply to the model, as
    /// PEFT's save_pretrained or a LoRA run's checkpoint writes it. A model that already holds adapters is an error.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<std::path::PathBuf>,
    /// A single prompt.
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// A JSONL file with one {"prompt": ...} object per line.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Render prompts with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens generated per completion.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = at_least_one)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, value_name = "T", default_value_t = 1.0, value_parser = non_negative)]
    pub temperature: f64,
    /// Nucleus sampling threshold in (0, 1]; 1 = off.
    #[arg(long, value_name = "P", default_value_t = 1.0, value_parser = unit_open_closed)]
    pub top_p: f64,
    /// Sample among the K most likely tokens; 0 = off.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens below P × the top probability; 0 = off.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = unit_closed)]
    pub min_p: f64,
    /// Penalty on tokens already present; 1 = off.
    #[arg(long, value_name = "R", default_value_t = 1.0, value_parser = positive)]
    pub repetition_penalty: f64,
    /// Random seed; outputs do not depend on batch composition.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Completions per prompt.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = at_least_one)]
    pub num_samples: usize,
    /// Sequences generated at once.
    #[arg(long, value_name = "B", default_value_t = 16, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Stop string (repeatable); generation also stops at the model's EOS ids.
    #[arg(long, value_name = "S")]
    pub stop: Vec<String>,
    /// Hub revision (branch, tag or commit); ignored for local models.
    #[arg(long, value_name = "R")]
    pub revision: Option<String>,
    /// auto | cpu | cuda | cuda:N | metal.
    #[arg(long, value_name = "D", default_value = "auto")]
    pub device: DeviceSpec,
    /// auto (f32 on CPU, bf16 on GPU) | f32 | bf16.
    #[arg(long, value_name = "D", default_value = "auto")]
    pub dtype: DTypeSpec,
    /// Write here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// text: completions separated by blank lines; jsonl: one JSON object per completion.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

/// Per-token log-probs and entropies of given completions under a model.
#[derive(Args, Debug)]
#[command(
    about = "Print the per-token log-probs and entropies of given completions under a model",
    long_about = "\
For each line of --input (a replay file's format: `prompt` text or messages, or `prompt_ids`; `completion` text,
or `completion_ids` / `token_ids`), print one JSON line: the input's fields, then `completion_ids`, `tokens`,
`logprobs` and `entropies` (one per completion token, of softmax(logits / temperature)) and `logprob_sum`.
Debug a reward hack, check parity with another trainer, or record `old_logprobs` for a replay file.

Example:
  safe logprobs --model ../shared/fixtures/tiny/tiny-llama --input completions.jsonl --temperature 0.7",
    after_help = exit::HELP
)]
pub struct LogprobsArgs {
    /// Local HF directory, .gguf file, hub id org/name, or a checkpoint directory.
    #[arg(long, value_name = "M")]
    pub model: String,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply to the model, as
    /// PEFT's save_pretrained or a LoRA run's checkpoint writes it. A model that already holds adapters is an error.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<std::path::PathBuf>,
    /// A JSONL file of prompts and completions.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// The temperature the log-probs are taken at (the recipe's rollout.temperature for old_logprobs).
    #[arg(long, value_name = "T", default_value_t = 1.0, value_parser = positive)]
    pub temperature: f64,
    /// Sequences per forward pass.
    #[arg(long, value_name = "B", default_value_t = 8, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Hub revision (branch, tag or commit); ignored for local models.
    #[arg(long, value_name = "R")]
    pub revision: Option<String>,
    /// auto | cpu | cuda | cuda:N | metal.
    #[arg(long, value_name = "D", default_value = "auto")]
    pub device: DeviceSpec,
    /// auto (f32 on CPU, bf16 on GPU) | f32 | bf16.
    #[arg(long, value_name = "D", default_value = "auto")]
    pub dtype: DTypeSpec,
    /// Write here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Write a LoRA checkpoint as a merged model or as its PEFT adapter.
#[derive(Args, Debug)]
#[command(
    about = "Write a LoRA checkpoint as a merged Hugging Face model, or its PEFT adapter alone",
    long_about = "\
Write a LoRA run's checkpoint as a new directory: with --merge, a plain Hugging Face model whose weights hold
the adapters merged in (W + s·B·A, what PEFT's merge_and_unload computes), which transformers, vLLM and
`safe generate` open with no adapter support; with --adapter, the PEFT adapter alone (adapter_config.json +
adapter_model.safetensors) for PeftModel.from_pretrained(base, DIR) or vLLM's LoRA loading.

CHECKPOINT is a checkpoint directory (verified against the digests its state.json records), a run directory
(its newest complete checkpoint) or a model directory holding adapters. OUT must not exist or be empty. A full
fine-tuning checkpoint has nothing to merge: `--merge OUT --dtype D` writes it in dtype D (a bf16 copy of a bf16
run's f32 master weights).

Examples:
  safe export runs/lora/checkpoints/step-200 --merge merged/
  safe export runs/lora --merge merged-bf16/ --dtype bf16
  safe export runs/lora --adapter adapter/
  safe export runs/full-bf16 --merge model-bf16/ --dtype bf16",
    after_help = exit::HELP,
    group(ArgGroup::new("what").required(true).args(["merge", "adapter"]))
)]
pub struct ExportArgs {
    /// A checkpoint directory, a run directory (its newest complete checkpoint) or a model directory with adapters.
    #[arg(value_name = "CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// Write the merged model (model.safetensors, config.json, generation_config.json, tokenizer) here.
    #[arg(long, value_name = "OUT")]
    pub merge: Option<PathBuf>,
    /// Write the PEFT adapter (adapter_config.json, adapter_model.safetensors) here.
    #[arg(long, value_name = "OUT")]
    pub adapter: Option<PathBuf>,
    /// The merged weights' dtype: f32 | bf16 | f16; default: the checkpoint's own (its config.json's dtype).
    #[arg(long, value_name = "D", conflicts_with = "adapter", value_parser = export_dtype)]
    pub dtype: Option<candle_core::DType>,
}

fn export_dtype(s: &str) -> Result<candle_core::DType, String> {
    match s {
        "f32" | "float32" => Ok(candle_core::DType::F32),
        "bf16" | "bfloat16" => Ok(candle_core::DType::BF16),
        "f16" | "float16" => Ok(candle_core::DType::F16),
        _ => Err("expected f32, bf16 or f16".into()),
    }
}

/// List the runs of an output directory.
#[derive(Args, Debug)]
#[command(
    about = "List the runs of an output directory: status, steps, differing recipe keys, eval reward",
    long_about = "\
List the runs of an output directory (each directory holding a recipe.resolved.toml or metrics.jsonl), sorted
by name: status (running, done, failed, interrupted, killed: died without finishing, unknown: no status.json),
the last step, the last training reward, the final and best `eval/reward`, and the recipe keys whose values
differ between the runs (`optim.lr=0.001`, `reward.0.weight=2`).

Examples:
  safe runs runs/
  safe runs runs/ --format jsonl",
    after_help = exit::HELP
)]
pub struct RunsArgs {
    /// The directory holding run directories (a recipe's run.output_dir).
    #[arg(value_name = "OUTPUT_DIR", default_value = "runs")]
    pub output_dir: PathBuf,
    /// table: aligned columns for people; jsonl: one JSON object per run, for scripts.
    #[arg(long, value_enum, default_value_t = RunsFormat::Table)]
    pub format: RunsFormat,
}

/// Write an HTML report of one or more runs.
#[derive(Args, Debug)]
#[command(
    about = "Write a self-contained HTML report of one or more runs: charts over steps and sample completions",
    long_about = "\
Write one self-contained HTML file (inline SVG charts, no script, nothing fetched when viewed): the runs with
their status and differing recipe keys; reward, per-reward means, evaluation, KL, entropy, completion length,
loss, gradient norm, learning rate, the timing split and the algorithm's controllers over steps, the runs
overlaid in one colour each; and sample completions of the first run. Prints the file's path.

Examples:
  safe report runs/quickstart
  safe report runs/lr-1e-3 runs/lr-3e-3 -o compare.html --completions-steps 1,150,300",
    after_help = exit::HELP
)]
pub struct ReportArgs {
    /// Run directories (`<run.output_dir>/<run.name>`), each with a metrics.jsonl.
    #[arg(value_name = "RUN_DIR", required = true)]
    pub run_dirs: Vec<PathBuf>,
    /// The HTML file to write; default `<first RUN_DIR>/report.html`.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Steps of the first run whose completions to show (comma-separated); default: its first, middle and last
    /// completions/step-<N>.jsonl.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    pub completions_steps: Vec<u64>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunsFormat {
    Table,
    Jsonl,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Jsonl,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected an integer ≥ 1".into()),
    }
}

fn float_in(s: &str, ok: impl Fn(f64) -> bool, what: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && ok(x) => Ok(x),
        _ => Err(format!("expected a number {what}")),
    }
}
fn non_negative(s: &str) -> Result<f64, String> {
    float_in(s, |x| x >= 0.0, "≥ 0")
}
fn positive(s: &str) -> Result<f64, String> {
    float_in(s, |x| x > 0.0, "> 0")
}
fn unit_open_closed(s: &str) -> Result<f64, String> {
    float_in(s, |x| x > 0.0 && x <= 1.0, "in (0, 1]")
}
fn unit_closed(s: &str) -> Result<f64, String> {
    float_in(s, |x| (0.0..=1.0).contains(&x), "in [0, 1]")
}

/// Run a parsed command line. The error carries the exit code.
pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Check(args) => check(&args),
        Command::Train(args) => train(&args),
        Command::Eval(args) => {
            let recipe = load(&args.config, &args.sets)?;
            let prepared = eval::prepare(&args, &recipe).or_exit(exit::BAD_INPUT)?;
            crate::signal::install();
            eval::run(&args, prepared).map_err(|e| match crate::signal::is(&e) {
                true => Failure::interrupted(e.context("interrupted: nothing was written")),
                false => Failure::training(e),
            })
        }
        Command::Export(args) => {
            let (what, out) = match (&args.merge, &args.adapter) {
                (Some(out), _) => (crate::checkpoint::Export::Merged { dtype: args.dtype }, out),
                (None, Some(out)) => (crate::checkpoint::Export::Adapter, out),
                (None, None) => unreachable!("clap requires --merge or --adapter"),
            };
            // Reading and checking the checkpoint is input (exit 2); failing to write the output is exit 1.
            let prepared = crate::checkpoint::export(&args.checkpoint, out, what).or_exit(exit::BAD_INPUT)?;
            let files = prepared.write().or_exit(exit::TRAINING_FAILED)?;
            let kind = match prepared.dtype {
                Some(d) => format!("merged model ({})", format!("{d:?}").to_lowercase()),
                None => "PEFT adapter".to_string(),
            };
            eprintln!("exported {} as a {kind}: {}", prepared.source.display(), files.join(", "));
            println!("{}", prepared.out.display());
            Ok(())
        }
        Command::Runs(args) => {
            let format = match args.format {
                RunsFormat::Table => report::RunsFormat::Table,
                RunsFormat::Jsonl => report::RunsFormat::Jsonl,
            };
            print!("{}", report::list_runs(&args.output_dir, format)?);
            Ok(())
        }
        Command::Report(args) => {
            let opts = report::ReportOptions {
                run_dirs: args.run_dirs,
                output: args.output,
                completions_steps: args.completions_steps,
            };
            println!("{}", report::write_report(&opts)?.display());
            Ok(())
        }
        Command::Logprobs(args) => {
            let prepared = logprobs::prepare(&args).or_exit(exit::BAD_INPUT)?;
            logprobs::run(&args, prepared).or_exit(exit::TRAINING_FAILED)
        }
        Command::Generate(args) => {
            // Loading and prompt preparation are input (exit 2); a failure while sampling is a run failure (exit 1).
            let prepared = generate::prepare(&args).or_exit(exit::BAD_INPUT)?;
            generate::run(&args, prepared).or_exit(exit::TRAINING_FAILED)
        }
    }
}

fn load(config: &std::path::Path, sets: &[String]) -> Result<Recipe, Failure> {
    recipe::load(config, sets).map_err(|e| Failure::bad_input(anyhow!(e).context("invalid recipe")))
}

fn check(args: &CheckArgs) -> Result<(), Failure> {
    if args.explain {
        print!("{}", recipe::explain(args.markdown));
        return Ok(());
    }
    let config = args.config.as_ref().expect("clap requires --config without --explain");
    let recipe = load(config, &args.sets)?;
    print!("{}", recipe.to_toml_string());
    Ok(())
}

fn train(args: &TrainArgs) -> Result<(), Failure> {
    use crate::train::run_dir::{self, Start};
    let recipe = load(&args.config, &args.sets)?;
    // Held until the process ends: no second process may resume, overwrite or supersede this run meanwhile.
    let _lock = run_dir::RunLock::acquire(&recipe.run).map_err(Failure::bad_input)?;
    let (start, warnings) =
        run_dir::resolve_start(&recipe, &args.resume, args.overwrite).map_err(Failure::bad_input)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", summary(&recipe, &args.resume));
    if let Start::From(c) = &start {
        println!("resuming:   from {} (step {})", c.dir().display(), c.step());
        if c.step() >= recipe.run.max_steps {
            println!(
                "nothing to train: the checkpoint is at step {} and run.max_steps = {} (raise run.max_steps, e.g. \
                 --set run.max_steps={}, to train further)",
                c.step(),
                recipe.run.max_steps,
                c.step() + recipe.run.max_steps
            );
            return Ok(());
        }
    }
    crate::signal::install();
    let max_steps = recipe.run.max_steps;
    let mut trainer = crate::train::Trainer::new(recipe, start)?;
    // status.json: `running` now, then how the run ended. A status that cannot be written is a warning, never
    // the reason a run stops.
    let run_dir = trainer.run_dir().to_path_buf();
    let write_status = |s: &Status| {
        if let Err(e) = s.write(&run_dir) {
            eprintln!("warning: {e:#}");
        }
    };
    let running = Status::running(trainer.state().step, max_steps);
    write_status(&running);
    let result = trainer.run();
    write_status(&running.finished(&result, trainer.state().step));
    result
}

/// What a run will do, in a few lines: the batch arithmetic users most often get wrong comes first.
pub fn summary(r: &Recipe, resume: &Resume) -> String {
    let ro = &r.rollout;
    let a = &r.algorithm;
    let n = ro.completions_per_step();
    let micro = match a.micro_batch_size {
        0 => "auto (chosen by the trainer to fit memory)".to_string(),
        m => format!("{} of {m} completions", n / m),
    };
    let source = match &ro.source {
        RolloutSource::Sample => format!(
            "sample, ≤ {} new tokens, temperature {}, top_p {}, top_k {}, min_p {}",
            ro.max_new_tokens, ro.temperature, ro.top_p, ro.top_k, ro.min_p
        ),
        RolloutSource::File(p) => format!("replayed from {}", p.display()),
    };
    let data = match &r.data.source {
        recipe::DataSource::Jsonl(p) => p.display().to_string(),
        recipe::DataSource::Builtin(b) => format!("builtin:{b}"),
    };
    let rewards: Vec<String> = r
        .rewards
        .iter()
        .map(|w| {
            let rule = match &w.source {
                RewardSource::Rule(Rule::ExactAnswer { field }) => format!("exact_answer vs `{field}`"),
                RewardSource::Rule(Rule::Regex { pattern }) => format!("regex {pattern:?}"),
                RewardSource::Rule(Rule::Length { target }) => format!("length, target {target}"),
                RewardSource::Rule(Rule::Contains { text }) => format!("contains {text:?}"),
                RewardSource::Command { argv, .. } => format!("command `{}`", argv.join(" ")),
                RewardSource::Http { urls, .. } => format!("http {}", urls.join(", ")),
                RewardSource::Model { id, chat, .. } => {
                    format!("reward model {id}{}", if *chat { ", chat" } else { "" })
                }
            };
            let gate = w.gate.as_ref().map(|g| format!(", only where {} ≥ {}", g.on, g.min)).unwrap_or_default();
            format!("{} (×{}: {rule}{gate})", w.name, w.weight)
        })
        .collect();
    let resume = match resume {
        Resume::Auto => "auto".to_string(),
        Resume::Never => "never".to_string(),
        Resume::Dir(d) => d.display().to_string(),
    };
    let lora = r
        .lora
        .as_ref()
        .map(|l| {
            format!(
                "lora:       rank {}, alpha {} ({}), on {}; frozen base{}{}{}\n",
                l.rank,
                l.alpha,
                if l.rslora { "α/√r" } else { "α/r" },
                l.targets.join(", "),
                match l.base_dtype {
                    crate::recipe::LoraBaseDtype::Bf16 => ", its linear weights in bf16",
                    crate::recipe::LoraBaseDtype::Model => "",
                },
                if r.model.reference.is_none() { " (with the adapters off, also the reference)" } else { "" },
                if l.dropout > 0.0 { format!("; dropout {}", l.dropout) } else { String::new() }
            )
        })
        .unwrap_or_default();
    format!(
        "run:        {} (max_steps {}, seed {}, resume {resume})\n\
         model:      {} @ {} (dtype {}, device {})\n\
         {lora}\
         data:       {data}\n\
         algorithm:  {} ({})\n\
         batch:      {} prompts × {} generations = {n} completions per step; micro-batches: {micro}\n\
         rollout:    {source}\n\
         optimizer:  AdamW lr {:?} ({} schedule, {} warm-up steps), max_grad_norm {}\n\
         rewards:    {}\n\
         recipe:     hash {}\n",
        r.run.dir().display(),
        r.run.max_steps,
        r.run.seed,
        r.model.id,
        r.model.revision,
        r.model.dtype,
        r.model.device,
        a.kind,
        a.settings.summary(),
        ro.prompts_per_step,
        ro.num_generations,
        r.optim.lr,
        r.optim.schedule,
        r.optim.warmup_steps,
        r.optim.max_grad_norm,
        rewards.join(", "),
        r.hash(),
    )
}
