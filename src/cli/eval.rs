//! `safe eval`: a model or checkpoint evaluated alone, on the held-out prompts a recipe names, exactly as
//! training evaluates (the same prompts, streams, rewards and metrics).

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::EvalArgs;
use crate::eval::Evaluator;
use crate::model::{CausalLm, LoadedModel, ModelSource, Tokenizer};
use crate::reward::RewardPipeline;

/// Everything before sampling: all errors here are bad input (exit 2).
pub struct Prepared {
    model: CausalLm,
    tokenizer: Tokenizer,
    rewards: RewardPipeline,
    evaluator: Evaluator,
    output: Option<super::output::OutputFile>,
}

pub fn prepare(args: &EvalArgs, recipe: &crate::recipe::Recipe) -> Result<Prepared> {
    let output = args.output.as_deref().map(super::output::OutputFile::create).transpose()?;
    let (dataset, note) = crate::eval::command_dataset(&recipe.data, &recipe.eval)?;
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    let device = recipe.model.device.device()?;
    let dtype = recipe.model.dtype.resolve(&device);
    let source = match &args.model {
        Some(m) => ModelSource::parse(m, None)?,
        None => ModelSource::parse(&recipe.model.id, Some(&recipe.model.revision))?,
    };
    let loaded = LoadedModel::load(&source, &device, dtype)?;
    let origin = loaded.origin.clone();
    let (model, tokenizer) = loaded.into_model(false, &device, dtype)?;
    let tokenizer = tokenizer.with_context(|| format!("{origin} has no tokenizer (tokenizer.json)"))?;
    if recipe.data.chat && !tokenizer.has_chat_template() {
        anyhow::bail!("data.chat = true but {origin} has no chat template: set data.chat = false");
    }
    let rewards = RewardPipeline::from_settings(&recipe.rewards, &device, dtype)?;
    rewards.check_rows(dataset.examples().iter().map(|e| (dataset.location(e.index), &e.columns)))?;
    let generation = crate::train::generation_config(&recipe.rollout, &tokenizer, args.batch_size);
    let (evaluator, note) =
        Evaluator::new(&recipe.eval, dataset, &tokenizer, &recipe.data, &generation, recipe.run.seed)?;
    if let Some(note) = note {
        eprintln!("warning: {note}");
    }
    Ok(Prepared { model, tokenizer, rewards, evaluator, output })
}

pub fn run(args: &EvalArgs, p: Prepared) -> Result<()> {
    let (prompts, k) = p.evaluator.size();
    let bar = ProgressBar::new((prompts * k) as u64);
    bar.set_style(ProgressStyle::with_template("{spinner} evaluating {pos}/{len} completions [{elapsed}]")?);
    let report = p.evaluator.run(&p.model, &p.tokenizer, &p.rewards, Some(&bar))?;
    bar.finish_and_clear();
    for note in &report.notes {
        eprintln!("warning: {note}");
    }
    if let Some(out) = p.output {
        use std::io::Write;
        let mut sink = super::output::Sink::new(Some(out));
        sink.write_all(report.jsonl(0).as_bytes())?;
        sink.finish()?;
    }
    if args.json {
        let fields: serde_json::Map<String, serde_json::Value> = report
            .metrics
            .iter()
            .map(|(n, v)| (n.clone(), serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into)))
            .collect();
        println!("{}", serde_json::Value::Object(fields));
    } else {
        println!("{}", report.console_line(0));
    }
    Ok(())
}
