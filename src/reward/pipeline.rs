//! The reward step: score every source → validate → (gates, later) → weighted sum → metrics (→ shaping, later).
//!
//! The order follows algorithms.md §5.3: every reward is validated before anything is combined, so a NaN hidden
//! behind a closed gate (or a zero weight) still stops the step instead of being trained on.

use std::collections::HashSet;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

use candle_core::{DType, Device};

use super::command::CommandSource;
use super::gate::{apply_gates, check_gates, Gate};
use super::http::HttpSource;
use super::model::RewardModel;
use super::scored::{metrics, ScoredBatch};
use super::{RewardInput, RewardSource, RuleSource};
use crate::recipe::{self, RewardSettings};

/// One `[[reward]]` entry.
struct Entry {
    weight: f64,
    source: Box<dyn RewardSource>,
    /// G-RA gate on another entry (by index).
    gate: Option<Gate>,
}

/// The rewards of a recipe, scored and combined together once per step.
pub struct RewardPipeline {
    entries: Vec<Entry>,
}

impl RewardPipeline {
    /// The recipe's rewards (reward models on `device` in `dtype`). Names must be unique (they key the metrics)
    /// and weights finite.
    pub fn from_settings(settings: &[RewardSettings], device: &Device, dtype: DType) -> Result<Self> {
        let sources = settings
            .iter()
            .map(|s| {
                let source: Box<dyn RewardSource> = match &s.source {
                    recipe::RewardSource::Rule(rule) => Box::new(RuleSource::new(&s.name, rule)?),
                    recipe::RewardSource::Model { id, chat, batch_size } => {
                        Box::new(RewardModel::load(&s.name, id, *chat, *batch_size, device, dtype)?)
                    }
                    recipe::RewardSource::Http { urls, label_field, timeout, max_retries } => {
                        Box::new(HttpSource::new(
                            &s.name,
                            urls,
                            label_field,
                            std::time::Duration::from_secs_f64(*timeout),
                            *max_retries,
                        )?)
                    }
                    recipe::RewardSource::Command { argv, timeout, max_retries } => Box::new(CommandSource::new(
                        &s.name,
                        argv,
                        std::time::Duration::from_secs_f64(*timeout),
                        *max_retries,
                    )?),
                };
                Ok((source, s.weight))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut pipeline = Self::new(sources)?;
        let gates = settings.iter().map(|s| s.gate.as_ref().map(|g| (g.on.as_str(), g.min))).collect::<Vec<_>>();
        pipeline.set_gates(&gates)?;
        Ok(pipeline)
    }

    /// A pipeline over ready-made sources with their weights, for sources the recipe does not build (tests, and the
    /// model/command/http sources until the recipe has them).
    pub fn new(sources: Vec<(Box<dyn RewardSource>, f64)>) -> Result<Self> {
        if sources.is_empty() {
            bail!("at least one reward is needed");
        }
        let mut seen = HashSet::new();
        for (source, weight) in &sources {
            let name = source.name();
            if !seen.insert(name.to_string()) {
                bail!("two rewards are named `{name}`; names must be unique (they key the metrics)");
            }
            if !weight.is_finite() {
                bail!("reward `{name}`: weight must be finite, got {weight}");
            }
        }
        let entries = sources.into_iter().map(|(source, weight)| Entry { weight, source, gate: None }).collect();
        Ok(RewardPipeline { entries })
    }

    /// G-RA gates, one per reward in order: `Some((other reward's name, min))` or `None`.
    pub fn set_gates(&mut self, gates: &[Option<(&str, f64)>]) -> Result<()> {
        if gates.len() != self.entries.len() {
            bail!("{} gate settings for {} rewards", gates.len(), self.entries.len());
        }
        let names: Vec<String> = self.names().map(str::to_string).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let resolved = gates
            .iter()
            .map(|g| {
                g.map(|(on, min)| {
                    let on = names
                        .iter()
                        .position(|n| *n == on)
                        .with_context(|| format!("gate on unknown reward `{on}`"))?;
                    Ok(Gate { on, min })
                })
                .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        check_gates(&resolved, &names)?;
        for (e, g) in self.entries.iter_mut().zip(resolved) {
            e.gate = g;
        }
        Ok(())
    }

    /// The reward names, in recipe order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.source.name())
    }

    /// Check every data row against every reward before training (`rows`: where each row is, e.g.
    /// `data.jsonl:7`, and its columns). The error lists the first bad rows with what is wrong and counts them all.
    pub fn check_rows<'a>(&self, rows: impl IntoIterator<Item = (String, &'a Map<String, Value>)>) -> Result<()> {
        const SHOWN: usize = 5;
        let mut bad = Vec::new();
        let mut count = 0usize;
        for (at, columns) in rows {
            for e in &self.entries {
                if let Err(why) = e.source.check_row(columns) {
                    count += 1;
                    if bad.len() < SHOWN {
                        bad.push(format!("{at}: reward `{}`: {why}", e.source.name()));
                    }
                }
            }
        }
        if count == 0 {
            return Ok(());
        }
        let more = if count > SHOWN { format!("\n  ... {} more", count - SHOWN) } else { String::new() };
        bail!(
            "{count} data row(s) cannot feed the rewards:\n  {}{more}\nFix or remove those rows (a null answer means \
             \"no reference\" and is allowed)",
            bad.join("\n  ")
        )
    }

    /// Score one step's batch. Fails (naming the reward, and the sample where there is one) if any source fails,
    /// returns the wrong number of values, or returns a non-finite value: no step trains on a partial or
    /// garbage batch of rewards. A sample a source could not score for a fault of its own data row is dropped
    /// instead (every reward `None`, so no advantage), counted in `rewards/dropped_samples` and noted. A batch
    /// with no reward at all (every sample `None`) fails: there is nothing to learn from.
    pub fn score(&self, batch: &[RewardInput]) -> Result<ScoredBatch> {
        let raw = self.score_sources(batch);
        let mut per_reward = Vec::with_capacity(self.entries.len());
        let mut dropped: Vec<(usize, String)> = Vec::new();
        let mut notes = Vec::new();
        for (entry, values) in self.entries.iter().zip(raw) {
            let name = entry.source.name();
            let values = values.with_context(|| format!("reward `{name}` failed"))?;
            validate(name, &values, batch.len())?;
            dropped.extend(entry.source.dropped().into_iter().map(|(i, why)| (i, format!("reward `{name}`: {why}"))));
            per_reward.push((name.to_string(), values));
        }
        dropped.sort_by_key(|(i, _)| *i);
        dropped.dedup_by_key(|(i, _)| *i);
        if let Some((first, why)) = dropped.first() {
            notes.push(format!(
                "{} of {} samples dropped (no reward) for a bad data row; the first, sample {first}: {why}",
                dropped.len(),
                batch.len()
            ));
        }
        for (_, values) in per_reward.iter_mut() {
            for (i, _) in &dropped {
                values[*i] = None;
            }
        }
        for (name, values) in &per_reward {
            if !batch.is_empty() && values.iter().all(Option::is_none) && dropped.len() < batch.len() {
                notes.push(format!("reward `{name}` answered null (not applicable) for every sample of the step"));
            }
        }
        if !batch.is_empty() && per_reward.iter().all(|(_, v)| v.iter().all(Option::is_none)) {
            let why = if dropped.len() == batch.len() {
                format!("every sample was dropped for a bad data row (the first: {})", dropped[0].1)
            } else {
                "every reward answered null (not applicable) for every sample".to_string()
            };
            bail!("no sample of the step has a reward: {why}; nothing to learn from");
        }
        // G-RA: gates read the validated raw values; gated-off values count as 0.
        let gates: Vec<Option<Gate>> = self.entries.iter().map(|e| e.gate).collect();
        let raw: Vec<Vec<Option<f64>>> = per_reward.iter().map(|(_, v)| v.clone()).collect();
        let (gated, open) = apply_gates(&raw, &gates)?;
        let total = self.weighted_sum(&gated, batch.len())?;
        let mut metrics = metrics(&per_reward, &total);
        for e in &self.entries {
            for (m, v) in e.source.metrics() {
                metrics.insert(metrics.len() - 2, (format!("rewards/{}/{m}", e.source.name()), v));
            }
        }
        for ((name, _), frac) in per_reward.iter().zip(open) {
            if let Some(f) = frac {
                metrics.insert(metrics.len() - 2, (format!("rewards/{name}/gate_open"), f));
            }
        }
        if !dropped.is_empty() {
            metrics.insert(metrics.len() - 2, ("rewards/dropped_samples".to_string(), dropped.len() as f64));
        }
        Ok(ScoredBatch { per_reward, total, metrics, notes })
    }

    /// Every source on its own thread, so slow ones (models, servers) overlap; the first runs on the caller's thread.
    fn score_sources(&self, batch: &[RewardInput]) -> Vec<Result<Vec<Option<f64>>>> {
        let Some((first, rest)) = self.entries.split_first() else { return Vec::new() };
        std::thread::scope(|s| {
            let handles: Vec<_> = rest.iter().map(|e| s.spawn(|| e.source.score(batch))).collect();
            let mut out = vec![first.source.score(batch)];
            out.extend(handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("panicked")))));
            out
        })
    }

    /// TRL's NaN-aware weighted sum: a `None` is left out of its sample's sum; all `None` → NaN.
    fn weighted_sum(&self, values: &[Vec<Option<f64>>], n: usize) -> Result<Vec<f64>> {
        (0..n)
            .map(|i| {
                let terms = self.entries.iter().zip(values).filter_map(|(e, v)| v[i].map(|x| e.weight * x));
                let total = terms.fold(None, |acc: Option<f64>, t| Some(acc.unwrap_or(0.0) + t));
                match total {
                    None => Ok(f64::NAN),
                    Some(t) if t.is_finite() => Ok(t),
                    Some(t) => {
                        bail!("the weighted reward of sample {i} is {t} (finite rewards, but the sum overflowed)")
                    }
                }
            })
            .collect()
    }
}

/// A source's answer must have one value per sample, each finite where given.
fn validate(name: &str, values: &[Option<f64>], n: usize) -> Result<()> {
    if values.len() != n {
        bail!("reward `{name}` returned {} values for a batch of {n} samples", values.len());
    }
    if let Some((i, x)) = values.iter().enumerate().find_map(|(i, v)| v.filter(|x| !x.is_finite()).map(|x| (i, x))) {
        bail!(
            "reward `{name}` returned {x} for sample {i}; rewards must be finite (return None for \"not applicable\")"
        );
    }
    Ok(())
}
