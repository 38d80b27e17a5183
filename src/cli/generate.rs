//! `safe generate`: load a model, render prompts (optionally through the chat template), sample in batches, and
//! print text or JSON lines.

use std::io::Write;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::{GenerateArgs, OutputFormat};
use crate::data::{Dataset, Prompt};
use crate::model::{LoadedModel, ModelSource};
use crate::rollout::{generate, GenerationConfig, Request, RowKey, SamplingParams};

/// Everything before sampling: all errors here are bad input (exit 2).
pub struct Prepared {
    model: crate::model::CausalLm,
    tokenizer: crate::model::Tokenizer,
    texts: Vec<String>,
    prompt_ids: Vec<Vec<u32>>,
    /// `--output`, created before anything is loaded: a path that cannot be written fails first, not after
    /// all the sampling.
    output: Option<super::output::OutputFile>,
}

pub fn prepare(args: &GenerateArgs) -> Result<Prepared> {
    let prompts = match (&args.prompt, &args.input) {
        (Some(p), None) => vec![Prompt::Text(p.clone())],
        (None, Some(f)) => Dataset::from_jsonl(f, "prompt")?.examples().iter().map(|e| e.prompt.clone()).collect(),
        _ => bail!("give exactly one of --prompt or --input"),
    };
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
    let texts = prompts.iter().map(|p| p.render(&tokenizer, args.chat)).collect::<Result<Vec<_>>>()?;
    let prompt_ids = texts.iter().map(|t| tokenizer.encode(t)).collect::<Result<Vec<_>>>()?;
    if let Some(i) = prompt_ids.iter().position(Vec::is_empty) {
        bail!("prompt {i} is empty after tokenisation");
    }
    Ok(Prepared { model, tokenizer, texts, prompt_ids, output })
}

pub fn run(args: &GenerateArgs, p: Prepared) -> Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
    };
    let eos_ids = p.tokenizer.eos_ids().to_vec();
    let pad_id = p.tokenizer.padding_id();
    let cfg = GenerationConfig {
        sampling,
        max_new_tokens: args.max_new_tokens,
        eos_ids,
        stop_strings: args.stop.clone(),
        batch_size: args.batch_size,
        pad_id,
    };
    let mut requests = Vec::new();
    for (i, ids) in p.prompt_ids.iter().enumerate() {
        for s in 0..args.num_samples {
            requests.push(Request {
                prompt: ids.clone(),
                key: RowKey { seed: args.seed, step: 0, prompt: i as u64, sample: s as u64 },
            });
        }
    }
    let bar = ProgressBar::new(requests.len() as u64);
    bar.set_style(ProgressStyle::with_template("{spinner} generating {pos}/{len} completions [{elapsed}]").unwrap());
    let completions = generate(&p.model, Some(&p.tokenizer), &requests, &cfg, Some(&bar))?;
    bar.finish_and_clear();

    let mut out = super::output::Sink::new(p.output);
    let jsonl = matches!(args.format, OutputFormat::Jsonl);
    for (r, c) in requests.iter().zip(&completions) {
        let text = p.tokenizer.decode(&c.ids, true)?;
        if jsonl {
            let line = serde_json::json!({
                "prompt_index": r.key.prompt, "sample_index": r.key.sample,
                "prompt": p.texts[r.key.prompt as usize], "completion": text,
                "finish_reason": c.finish, "num_tokens": c.ids.len(), "token_ids": c.ids,
                "logprob_sum": c.logprobs.iter().map(|&x| x as f64).sum::<f64>(),
            });
            writeln!(out, "{line}")?;
        } else {
            if requests.len() > 1 {
                writeln!(out, "=== prompt {} sample {} ({:?}) ===", r.key.prompt, r.key.sample, c.finish)?;
            }
            writeln!(out, "{text}")?;
        }
    }
    out.finish()
}
