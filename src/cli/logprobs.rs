//! `safe logprobs`: per-token log-probs and entropies of given completions under a model, as JSON lines.

use std::io::Write;

use anyhow::{Context, Result};

use super::LogprobsArgs;
use crate::model::logprobs::{completion_logprobs, SequenceBatch};
use crate::model::{CausalLm, LoadedModel, ModelSource, Tokenizer};
use crate::rollout::replay::parse_rollout_line;
use crate::rollout::Sample;

/// Everything before the forwards: every error here is bad input (exit 2), naming the file and line.
pub struct Prepared {
    model: CausalLm,
    tokenizer: Tokenizer,
    /// Each input line's sample and its JSON object (echoed in the output).
    lines: Vec<(Sample, serde_json::Map<String, serde_json::Value>)>,
    /// `--output`, created first: a path that cannot be written fails before the model loads.
    output: Option<super::output::OutputFile>,
}

pub fn prepare(args: &LogprobsArgs) -> Result<Prepared> {
    let output = args.output.as_deref().map(super::output::OutputFile::create).transpose()?;
    let device = args.device.device()?;
    let dtype = args.dtype.resolve(&device);
    let source = ModelSource::parse(&args.model, args.revision.as_deref())?;
    let mut loaded = LoadedModel::load(&source, &device, dtype)?;
    if let Some(dir) = &args.adapter {
        loaded = loaded.with_adapter_dir(dir, &device, dtype)?;
    }
    let origin = loaded.origin.clone();
    let (model, tokenizer) = loaded.into_model(false, &device, dtype)?;
    let tokenizer = tokenizer.with_context(|| format!("{origin} has no tokenizer (tokenizer.json)"))?;
    let path = &args.input;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut lines = Vec::new();
    for line in crate::data::lines::bounded_lines(file, crate::data::lines::MAX_LINE_BYTES) {
        let (n, line) = line.with_context(|| format!("{}: cannot read it", path.display()))?;
        let at = format!("{}:{n}", path.display());
        if line.trim().is_empty() {
            continue;
        }
        let sample = parse_rollout_line(&line, &tokenizer).with_context(|| at.clone())?;
        let object = serde_json::from_str(&line).with_context(|| at.clone())?;
        lines.push((sample, object));
    }
    if lines.is_empty() {
        anyhow::bail!("{} has no lines", path.display());
    }
    Ok(Prepared { model, tokenizer, lines, output })
}

pub fn run(args: &LogprobsArgs, p: Prepared) -> Result<()> {
    let mut out = super::output::Sink::new(p.output);
    let pad = p.tokenizer.padding_id();
    for batch in p.lines.chunks(args.batch_size) {
        let prompts: Vec<Vec<u32>> = batch.iter().map(|(s, _)| s.prompt_ids.clone()).collect();
        let completions: Vec<Vec<u32>> = batch.iter().map(|(s, _)| s.completion_ids.clone()).collect();
        let seqs = SequenceBatch::new(&prompts, &completions, pad, p.model.config().sliding_window, p.model.device())?;
        let (lp, ent) = completion_logprobs(&p.model, &seqs, args.temperature, 0, true)?;
        let (lp, ent) = (lp.to_vec2::<f32>()?, ent.context("requested")?.to_vec2::<f32>()?);
        for (k, (sample, object)) in batch.iter().enumerate() {
            let n = sample.completion_ids.len();
            let logprobs = &lp[k][..n];
            let mut line = object.clone();
            let tokens: Vec<String> =
                sample.completion_ids.iter().map(|&id| p.tokenizer.id_to_token(id).unwrap_or_default()).collect();
            line.insert("completion_ids".into(), sample.completion_ids.clone().into());
            line.insert("tokens".into(), tokens.into());
            line.insert("logprobs".into(), logprobs.to_vec().into());
            line.insert("entropies".into(), ent[k][..n].to_vec().into());
            line.insert("logprob_sum".into(), logprobs.iter().map(|&x| x as f64).sum::<f64>().into());
            writeln!(out, "{}", serde_json::Value::Object(line))?;
        }
    }
    out.finish()
}
