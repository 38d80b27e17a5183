//! A step's scored rewards: each reward's raw values, the weighted total and the metrics of both. Built by the
//! reward pipeline; read by the trainer and the algorithms (this file imports nothing of the recipe's).

/// One step's rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredBatch {
    /// Each reward's raw (unweighted) values in recipe order, for logging and the completions files.
    pub per_reward: Vec<(String, Vec<Option<f64>>)>,
    /// Per sample: Σ weight × value over the rewards that gave a value (TRL's NaN-aware sum); NaN when none did,
    /// which the advantage step treats as missing.
    pub total: Vec<f64>,
    /// `rewards/<name>/mean`, `rewards/<name>/std` per reward in recipe order, then `reward` and `reward_std`.
    pub metrics: Vec<(String, f64)>,
    /// Warnings for the console (samples dropped for a bad data row, a reward that answered null for all).
    pub notes: Vec<String>,
}

impl ScoredBatch {
    /// The rows `picks` = (batch, row) of several scored batches, in that order (dynamic sampling's kept groups),
    /// with `rewards/<name>/mean|std`, `reward` and `reward_std` recomputed over them; the sources' own metrics and
    /// gate fractions are the first batch's.
    pub fn select(batches: &[ScoredBatch], picks: &[(usize, usize)]) -> ScoredBatch {
        let Some(first) = batches.first() else {
            return ScoredBatch { per_reward: Vec::new(), total: Vec::new(), metrics: Vec::new(), notes: Vec::new() };
        };
        let per_reward: Vec<(String, Vec<Option<f64>>)> = first
            .per_reward
            .iter()
            .enumerate()
            .map(|(k, (name, _))| (name.clone(), picks.iter().map(|&(b, i)| batches[b].per_reward[k].1[i]).collect()))
            .collect();
        let total: Vec<f64> = picks.iter().map(|&(b, i)| batches[b].total[i]).collect();
        let mut metrics = metrics(&per_reward, &total);
        let standard: Vec<String> = metrics.iter().map(|(n, _)| n.clone()).collect();
        for (name, v) in first.metrics.iter().filter(|(n, _)| !standard.contains(n)) {
            metrics.insert(metrics.len() - 2, (name.clone(), *v));
        }
        let notes = batches.iter().flat_map(|b| b.notes.iter().cloned()).collect();
        ScoredBatch { per_reward, total, metrics, notes }
    }
}

/// `rewards/<name>/mean|std` over each reward's non-None values, then `reward` and `reward_std` over the non-NaN
/// totals of the whole batch. TRL's `reward_std` is the mean of the group stds under `scale_rewards = group`; the
/// trainer knows the groups and takes that one from the advantage step instead.
pub(crate) fn metrics(per_reward: &[(String, Vec<Option<f64>>)], total: &[f64]) -> Vec<(String, f64)> {
    let mut out = Vec::with_capacity(2 * per_reward.len() + 2);
    for (name, values) in per_reward {
        let (mean, std) = mean_std(values.iter().flatten().copied());
        out.push((format!("rewards/{name}/mean"), mean));
        out.push((format!("rewards/{name}/std"), std));
    }
    let (mean, std) = mean_std(total.iter().copied().filter(|x| !x.is_nan()));
    out.push(("reward".to_string(), mean));
    out.push(("reward_std".to_string(), std));
    out
}

/// Mean and **unbiased** std (n − 1, TRL's `nanstd`) of the valid values. NaN where undefined: mean with no values,
/// std with fewer than two (as TRL logs them).
fn mean_std(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = values.clone().count();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.clone().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = values.map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    (mean, var.sqrt())
}
