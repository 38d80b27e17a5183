//! Choosing the next token from one row of logits, in transformers' processor order: repetition penalty, then
//! temperature, top-k, top-p, min-p. The returned log-prob is that of the chosen token under the
//! temperature-scaled *full* distribution of the raw logits (no penalty, no truncation): exactly what the training
//! forward recomputes, so importance ratios start at 1.

use super::rng::RowRng;

/// Sampling settings. `temperature = 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Nucleus mass kept, in (0, 1]; 1 = off.
    pub top_p: f64,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 = off.
    pub min_p: f64,
    /// transformers' repetition penalty on tokens already in the sequence; 1 = off.
    pub repetition_penalty: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, min_p: 0.0, repetition_penalty: 1.0 }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// log-softmax of `logits / temperature` at `token`, computed in f64.
pub fn token_logprob(logits: &[f32], temperature: f64, token: u32) -> f32 {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64 / t;
    let lse = logits.iter().map(|&x| (x as f64 / t - max).exp()).sum::<f64>().ln() + max;
    (logits[token as usize] as f64 / t - lse) as f32
}

/// Pick the next token; returns it with its log-prob (see module doc). `history` is the row's prompt and
/// completion so far (for the repetition penalty).
pub fn sample(logits: &[f32], params: &SamplingParams, history: &[u32], rng: &mut RowRng) -> (u32, f32) {
    let mut scores: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    if params.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            if let Some(s) = scores.get_mut(id as usize) {
                // transformers: negative scores are multiplied, positive divided, so both become less likely.
                *s = if *s < 0.0 { *s * params.repetition_penalty } else { *s / params.repetition_penalty };
            }
        }
    }
    let token = if params.is_greedy() {
        argmax(&scores)
    } else {
        for s in scores.iter_mut() {
            *s /= params.temperature;
        }
        draw(&scores, params, rng.next_f64())
    };
    (token, token_logprob(logits, params.temperature, token))
}

fn argmax(scores: &[f64]) -> u32 {
    // First maximum, as torch.argmax does.
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// Draw from softmax(scores) after top-k / top-p / min-p with uniform `u` in [0, 1).
fn draw(scores: &[f64], params: &SamplingParams, u: f64) -> u32 {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let probs: Vec<f64> = scores.iter().map(|&s| (s - max).exp()).collect();
    let filtered = params.top_k > 0 || params.top_p < 1.0 || params.min_p > 0.0;
    if !filtered {
        return inverse_cdf(probs.iter().copied().enumerate(), probs.iter().sum(), u);
    }
    // Candidates most likely first (ties by id), so the filters' cuts are deterministic.
    let mut cand: Vec<(usize, f64)> = probs.iter().copied().enumerate().collect();
    let by_prob = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if params.top_k > 0 && params.top_k < cand.len() {
        cand.select_nth_unstable_by(params.top_k - 1, by_prob);
        // transformers keeps every token whose score ties the k-th.
        let kth = cand[params.top_k - 1].1;
        cand.retain(|c| c.1 >= kth);
    }
    cand.sort_unstable_by(by_prob);
    if params.top_p < 1.0 {
        let total: f64 = cand.iter().map(|c| c.1).sum();
        let mut cum = 0.0;
        let mut keep = 0;
        for c in &cand {
            keep += 1;
            cum += c.1 / total;
            if cum >= params.top_p {
                break;
            }
        }
        cand.truncate(keep.max(1));
    }
    if params.min_p > 0.0 {
        let total: f64 = cand.iter().map(|c| c.1).sum();
        let threshold = params.min_p * cand[0].1 / total;
        cand.retain(|c| c.1 / total >= threshold);
    }
    // Draw over the kept ids in id order, as the unfiltered draw does and as the tensor sampler (which has no
    // sort) must: the same distribution as walking them most likely first, and the same token on either path.
    cand.sort_unstable_by_key(|c| c.0);
    let total = cand.iter().map(|c| c.1).sum();
    inverse_cdf(cand.into_iter(), total, u)
}

fn inverse_cdf(items: impl Iterator<Item = (usize, f64)>, total: f64, u: f64) -> u32 {
    let target = u * total;
    let mut cum = 0.0;
    let mut last = 0;
    for (id, p) in items {
        if p <= 0.0 {
            continue;
        }
        cum += p;
        last = id;
        if cum > target {
            return id as u32;
        }
    }
    last as u32 // rounding left target just above the sum: take the last token with mass
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::rng::RowKey;

    fn rng() -> RowRng {
        RowRng::new(RowKey { seed: 7, step: 0, prompt: 0, sample: 0 })
    }

    /// Frequencies of each token over many draws.
    fn histogram(logits: &[f32], params: &SamplingParams, n: usize) -> Vec<usize> {
        let mut r = rng();
        let mut h = vec![0; logits.len()];
        for _ in 0..n {
            h[sample(logits, params, &[], &mut r).0 as usize] += 1;
        }
        h
    }

    #[test]
    fn greedy_takes_first_maximum_and_logprob_is_untempered() {
        let logits = [1.0f32, 3.0, 3.0, -1.0];
        let (t, lp) = sample(&logits, &SamplingParams::greedy(), &[], &mut rng());
        assert_eq!(t, 1);
        // log softmax: 3 - ln(e^1 + 2e^3 + e^-1)
        let want = 3.0 - (1f64.exp() + 2.0 * 3f64.exp() + (-1f64).exp()).ln();
        assert!((lp as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn logprob_is_under_temperature_scaled_full_distribution() {
        let logits = [0.0f32, 1.0, 2.0];
        let p = SamplingParams { temperature: 0.5, top_k: 1, ..Default::default() };
        let (t, lp) = sample(&logits, &p, &[], &mut rng());
        assert_eq!(t, 2, "top_k = 1 keeps the best token");
        // logits / 0.5 = [0, 2, 4]; log p(2) = 4 - ln(1 + e^2 + e^4), not 0 (the truncated distribution).
        let want = 4.0 - (1.0 + 2f64.exp() + 4f64.exp()).ln();
        assert!((lp as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_support() {
        // probs ∝ [8, 4, 2, 1, 1] / 16 = [0.5, 0.25, 0.125, 0.0625, 0.0625]
        let logits: Vec<f32> = [8.0f32, 4.0, 2.0, 1.0, 1.0].iter().map(|x| x.ln()).collect();
        let h = histogram(&logits, &SamplingParams { top_k: 2, ..Default::default() }, 3000);
        assert!(h[0] > 0 && h[1] > 0 && h[2..].iter().all(|&c| c == 0), "{h:?}");
        // top_p = 0.7: 0.5 < 0.7, 0.75 ≥ 0.7 → {0, 1}
        let h = histogram(&logits, &SamplingParams { top_p: 0.7, ..Default::default() }, 3000);
        assert!(h[0] > 0 && h[1] > 0 && h[2..].iter().all(|&c| c == 0), "{h:?}");
        // min_p = 0.2: threshold 0.1 → {0, 1, 2}
        let h = histogram(&logits, &SamplingParams { min_p: 0.2, ..Default::default() }, 3000);
        assert!(h[2] > 0 && h[3] == 0 && h[4] == 0, "{h:?}");
        // Unfiltered: frequencies follow the probabilities.
        let h = histogram(&logits, &SamplingParams::default(), 20000);
        let f0 = h[0] as f64 / 20000.0;
        assert!((f0 - 0.5).abs() < 0.02, "{f0}");
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores() {
        let logits = [2.0f32, 1.9, -1.0, -1.1];
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        // Token 0 seen: 2.0 / 2 = 1.0 < 1.9 → greedy picks 1.
        assert_eq!(sample(&logits, &p, &[0], &mut rng()).0, 1);
        // Only negatives left: seen token 2 becomes -2.0 < -1.1.
        let logits = [-1.0f32, -1.1];
        assert_eq!(sample(&logits, &p, &[0], &mut rng()).0, 1);
    }
}
