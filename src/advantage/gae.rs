//! Token-level advantages for actor-critic methods (PPO): per-token rewards (KL penalty plus the sequence score at
//! one token), generalised advantage estimation, and whitening, as ../shared/algorithms.md §6.2–6.3 state them for
//! TRL's PPOTrainer and OpenRLHF. Pure functions over rows of f64, one row per completion, `mask` 1 on real tokens.

choice_enum!(
    /// Where the sequence score is added.
    #[derive(Default)]
    ScorePlacement {
        /// At the last real token (OpenRLHF; `safe`'s default).
        #[default]
        LastToken = "last_token",
        /// One past the last real token when that index exists, else at it (TRL's PPOTrainer).
        TrlP1 = "trl_p1",
    }
);

choice_enum!(
    /// Advantage whitening's variance.
    #[derive(Default)]
    Whitening {
        /// (A − mean)·max(var_p, 1e-8)^−½ over all real tokens of the batch (OpenRLHF).
        #[default]
        Population = "population",
        /// (A − mean)·(var_u + 1e-8)^−½ (TRL's `masked_whiten`).
        Unbiased = "unbiased",
        /// No whitening.
        None = "none",
    }
);

/// Per-token rewards: −β·kl_t on real tokens, plus `score` at the placement's index. Padding gets 0.
pub fn token_rewards(kl: &[f64], mask: &[f64], score: f64, beta: f64, placement: ScorePlacement) -> Vec<f64> {
    let mut r: Vec<f64> = kl.iter().zip(mask).map(|(k, m)| if *m > 0.0 { -beta * k } else { 0.0 }).collect();
    let Some(last) = mask.iter().rposition(|m| *m > 0.0) else { return r };
    let at = match placement {
        ScorePlacement::LastToken => last,
        ScorePlacement::TrlP1 if last + 1 < r.len() => last + 1,
        ScorePlacement::TrlP1 => last,
    };
    r[at] += score;
    r
}

/// How many leading positions of a row carry critic values: through the last real token, or one more for TRL's
/// p1 placement (TRL keeps the value at the score's index).
pub fn value_len(mask: &[f64], placement: ScorePlacement) -> usize {
    match (mask.iter().rposition(|m| *m > 0.0), placement) {
        (None, _) => 0,
        (Some(last), ScorePlacement::LastToken) => last + 1,
        (Some(last), ScorePlacement::TrlP1) => (last + 2).min(mask.len()),
    }
}

/// GAE backwards over one row: δ_t = r_t + γ·V_{t+1} − V_t with V = 0 from `value_len` on (past the end too),
/// A_t = δ_t + γλ·A_{t+1}. Returns (advantages, returns = A + V), both 0 where `mask` is 0.
pub fn gae(
    rewards: &[f64],
    values: &[f64],
    mask: &[f64],
    value_len: usize,
    gamma: f64,
    lam: f64,
) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let v = |t: usize| if t < value_len.min(n) { values[t] } else { 0.0 };
    let mut adv = vec![0.0; n];
    let mut next = 0.0;
    for t in (0..n).rev() {
        let delta = rewards[t] + gamma * v(t + 1) - v(t);
        next = delta + gamma * lam * next;
        adv[t] = next;
    }
    let ret: Vec<f64> = (0..n).map(|t| if mask[t] > 0.0 { adv[t] + v(t) } else { 0.0 }).collect();
    for (a, m) in adv.iter_mut().zip(mask) {
        if *m == 0.0 {
            *a = 0.0;
        }
    }
    (adv, ret)
}

/// Whiten advantages over every real token of the batch (in place); padding stays 0.
pub fn whiten(adv: &mut [Vec<f64>], mask: &[Vec<f64>], kind: Whitening) {
    if kind == Whitening::None {
        return;
    }
    let vals: Vec<f64> =
        adv.iter().zip(mask).flat_map(|(a, m)| a.iter().zip(m).filter(|(_, m)| **m > 0.0).map(|(a, _)| *a)).collect();
    let n = vals.len() as f64;
    if vals.is_empty() {
        return;
    }
    let mean = vals.iter().sum::<f64>() / n;
    let ss = vals.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>();
    let scale = match kind {
        Whitening::Population => 1.0 / (ss / n).max(1e-8).sqrt(),
        Whitening::Unbiased => 1.0 / (if n > 1.0 { ss / (n - 1.0) } else { 0.0 } + 1e-8).sqrt(),
        Whitening::None => unreachable!(),
    };
    for (a, m) in adv.iter_mut().zip(mask) {
        for (x, m) in a.iter_mut().zip(m) {
            *x = if *m > 0.0 { (*x - mean) * scale } else { 0.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn worked_example_gae_and_whitening() {
        // algorithms.md §6.3: mask [1, 1, 1, 0], logp [−1.0, −0.5, −2.0], ref [−1.2, −0.4, −2.5] → k1 KL
        // [0.2, −0.1, 0.5]; β = 0.05; score 1.0 at the last real token → rewards [−0.01, 0.005, 0.975, 0].
        let mask = [1.0, 1.0, 1.0, 0.0];
        let kl = [0.2, -0.1, 0.5, 0.0];
        let r = token_rewards(&kl, &mask, 1.0, 0.05, ScorePlacement::LastToken);
        close(&r, &[-0.01, 0.005, 0.975, 0.0], 1e-15);
        let values = [0.5, 0.6, 0.7, 0.0];
        let len = value_len(&mask, ScorePlacement::LastToken);
        assert_eq!(len, 3);
        let (a, ret) = gae(&r, &values, &mask, len, 0.9, 0.8);
        close(&a, &[0.1977600000000001, 0.23300000000000007, 0.275, 0.0], 1e-15);
        close(&ret, &[0.6977600000000002, 0.8330000000000001, 0.975, 0.0], 1e-15);
        let (a1, ret1) = gae(&r, &values, &mask, len, 1.0, 0.95);
        close(&a1, &[0.4379374999999999, 0.36624999999999996, 0.275, 0.0], 1e-15);
        close(&ret1, &[0.9379374999999999, 0.9662499999999999, 0.975, 0.0], 1e-15);
        // Whitening together with a second sequence's [0.3, −0.2] (5 real tokens).
        let masks = vec![mask.to_vec(), vec![1.0, 1.0]];
        let mut trl = vec![a.clone(), vec![0.3, -0.2]];
        whiten(&mut trl, &masks, Whitening::Unbiased);
        close(&trl[0][..3], &[0.17800827348307827, 0.34936457695618967, 0.553591726384983], 1e-12);
        close(&trl[1], &[0.6751555058068838, -1.756120082631135], 1e-12);
        assert_eq!(trl[0][3], 0.0);
        let mut orl = vec![a, vec![0.3, -0.2]];
        whiten(&mut orl, &masks, Whitening::Population);
        close(&orl[0][..3], &[0.19901932356123592, 0.3906015176799514, 0.6189344391608268], 1e-12);
        close(&orl[1], &[0.7548468924232525, -1.9634021728252666], 1e-12);
    }

    #[test]
    fn trl_places_the_score_one_past_the_last_token() {
        let mask = [1.0, 1.0, 0.0, 0.0];
        assert_eq!(token_rewards(&[0.0; 4], &mask, 2.0, 0.1, ScorePlacement::TrlP1), vec![0.0, 0.0, 2.0, 0.0]);
        assert_eq!(value_len(&mask, ScorePlacement::TrlP1), 3);
        let full = [1.0, 1.0];
        assert_eq!(value_len(&full, ScorePlacement::TrlP1), 2);
        assert_eq!(token_rewards(&[0.0; 2], &full, 2.0, 0.1, ScorePlacement::TrlP1), vec![0.0, 2.0]);
        // An empty completion gets no score position.
        assert_eq!(token_rewards(&[0.0; 2], &[0.0, 0.0], 2.0, 0.1, ScorePlacement::LastToken), vec![0.0, 0.0]);
    }
}
