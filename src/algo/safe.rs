//! SAFE (arXiv 2602.04651; ../shared/algorithms.md §1): a sequence-level actor-critic with a pessimistic double
//! soft-min critic, a reward normaliser, and an entropy-gated KL penalty whose threshold a PID controller on the
//! reward's velocity moves. The numbers come first, each a pure function or a small state machine whose whole state
//! is serialisable (checkpointed), tested against §1.9's worked examples; then the step ([`safe_update`]) and the
//! algorithm with its critic heads ([`Safe`]).

use serde::{Deserialize, Serialize};

/// V = −α·(logsumexp(−V1/α, −V2/α) − ln 2): below the mean of the two heads, → min as α → 0, → mean as α → ∞.
pub fn soft_min(v1: f64, v2: f64, alpha: f64) -> f64 {
    let (a, b) = (-v1 / alpha, -v2 / alpha);
    let m = a.max(b);
    let lse = m + ((a - m).exp() + (b - m).exp()).ln();
    -alpha * (lse - std::f64::consts::LN_2)
}

/// ∂V/∂V_k: the weights of the two heads (the lower head gets more).
pub fn soft_min_weights(v1: f64, v2: f64, alpha: f64) -> (f64, f64) {
    let (a, b) = (-v1 / alpha, -v2 / alpha);
    let m = a.max(b);
    let (ea, eb) = ((a - m).exp(), (b - m).exp());
    (ea / (ea + eb), eb / (ea + eb))
}

/// Running reward statistics (Chan's parallel update as the official `RewardNormalizer` does it: the batch variance
/// is unbiased, the running one M2/count); init count 1e-4, mean 0, var 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardNormalizer {
    pub count: f64,
    pub mean: f64,
    pub var: f64,
    pub eps: f64,
}

impl Default for RewardNormalizer {
    fn default() -> Self {
        Self { count: 1e-4, mean: 0.0, var: 1.0, eps: 1e-8 }
    }
}

impl RewardNormalizer {
    /// Fold in the batch, then normalise it with the new statistics: (x − μ)/(√v + eps).
    pub fn update_and_normalize(&mut self, x: &[f64]) -> Vec<f64> {
        let n = x.len() as f64;
        if x.is_empty() {
            return Vec::new();
        }
        let bm = x.iter().sum::<f64>() / n;
        let bv = if x.len() > 1 { x.iter().map(|v| (v - bm) * (v - bm)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        let delta = bm - self.mean;
        let total = self.count + n;
        let mean = self.mean + delta * n / total;
        let m2 = self.var * self.count + bv * n + delta * delta * self.count * n / total;
        (self.count, self.mean, self.var) = (total, mean, m2 / total);
        let sd = self.var.sqrt() + self.eps;
        x.iter().map(|v| (v - self.mean) / sd).collect()
    }
}

/// Advantages: a_i = r̃_i − V_old,i, whitened with the unbiased std: (a − mean)/(std_u + 1e-8); 0 for a batch of
/// one (the official code's NaN; recipes require two or more).
pub fn advantages(normalized: &[f64], v_old: &[f64]) -> Vec<f64> {
    let a: Vec<f64> = normalized.iter().zip(v_old).map(|(r, v)| r - v).collect();
    let n = a.len() as f64;
    if a.len() < 2 {
        return vec![0.0; a.len()];
    }
    let mean = a.iter().sum::<f64>() / n;
    let std = (a.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)).sqrt();
    a.iter().map(|x| (x - mean) / (std + 1e-8)).collect()
}

/// Huber_δ(e) = ½e² if |e| ≤ δ else δ·(|e| − ½δ).
pub fn huber(e: f64, delta: f64) -> f64 {
    if e.abs() <= delta {
        0.5 * e * e
    } else {
        delta * (e.abs() - 0.5 * delta)
    }
}

/// SAFE's value loss: ½·[mean Huber(V − r̃) + mean Huber(V_clip − r̃)], V_clip = V_old + clip(V − V_old, ±clip).
pub fn value_loss(v: &[f64], v_old: &[f64], target: &[f64], clip: f64, delta: f64) -> f64 {
    let n = v.len().max(1) as f64;
    let (mut a, mut b) = (0.0, 0.0);
    for i in 0..v.len() {
        let v_clip = super::loss::clipped_value(v[i], v_old[i], clip);
        a += huber(v[i] - target[i], delta);
        b += huber(v_clip - target[i], delta);
    }
    0.5 * (a / n + b / n)
}

/// PID on the reward's velocity: an EMA of the mean reward, its change as the velocity, error = velocity − target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pid {
    pub kp: f64,
    pub ki: f64,
    pub kd: f64,
    pub reward_ema: f64,
    pub target_velocity: f64,
    pub integral_clamp: f64,
    /// `None` until the first call.
    pub ema: Option<f64>,
    pub integral: f64,
    pub prev_error: f64,
}

impl Default for Pid {
    fn default() -> Self {
        Self {
            kp: 0.3,
            ki: 0.01,
            kd: 0.05,
            reward_ema: 0.95,
            target_velocity: 0.001,
            integral_clamp: 1.0,
            ema: None,
            integral: 0.0,
            prev_error: 0.0,
        }
    }
}

impl Pid {
    /// First call: the EMA starts at r and the output is 0. Later: ema ← β·ema + (1 − β)·r, v = Δema,
    /// e = v − target, I ← clamp(I + e), out = kp·e + ki·I + kd·(e − e_prev).
    pub fn update(&mut self, r: f64) -> f64 {
        let Some(old) = self.ema else {
            self.ema = Some(r);
            return 0.0;
        };
        let ema = self.reward_ema * old + (1.0 - self.reward_ema) * r;
        self.ema = Some(ema);
        let e = (ema - old) - self.target_velocity;
        self.integral = (self.integral + e).clamp(-self.integral_clamp, self.integral_clamp);
        let out = self.kp * e + self.ki * self.integral + self.kd * (e - self.prev_error);
        self.prev_error = e;
        out
    }
}

/// Training phase from the reward history, and its threshold multiplier φ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Warmup,
    Climbing,
    Plateau,
    Converged,
}

/// The phase detector: the last 2·window rewards (all it ever reads), and its constants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseDetector {
    pub window: usize,
    pub climb_margin: f64,
    pub converge_std: f64,
    pub converge_min: f64,
    /// φ for warmup, climbing, plateau, converged.
    pub multipliers: [f64; 4],
    pub history: Vec<f64>,
    pub phase: Phase,
}

impl Default for PhaseDetector {
    fn default() -> Self {
        Self {
            window: 50,
            climb_margin: 0.01,
            converge_std: 0.02,
            converge_min: 0.7,
            multipliers: [1.5, 1.2, 0.8, 1.0],
            history: Vec::new(),
            phase: Phase::Warmup,
        }
    }
}

impl PhaseDetector {
    /// Append r; fewer than `window` values → warmup; else compare the last window with the one before it (or with
    /// itself while fewer than 2·window exist): climbing if its mean is higher by the margin, converged if its
    /// population std is small and its mean high, else plateau.
    pub fn update(&mut self, r: f64) -> Phase {
        let w = self.window;
        self.history.push(r);
        if self.history.len() > 2 * w {
            self.history.remove(0);
        }
        let h = &self.history;
        self.phase = if h.len() < w {
            Phase::Warmup
        } else {
            let recent = &h[h.len() - w..];
            let old = if h.len() >= 2 * w { &h[h.len() - 2 * w..h.len() - w] } else { recent };
            let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
            let (mr, mo) = (mean(recent), mean(old));
            let sr = (recent.iter().map(|x| (x - mr) * (x - mr)).sum::<f64>() / w as f64).sqrt();
            if mr > mo + self.climb_margin {
                Phase::Climbing
            } else if sr < self.converge_std && mr > self.converge_min {
                Phase::Converged
            } else {
                Phase::Plateau
            }
        };
        self.phase
    }

    pub fn multiplier(&self) -> f64 {
        let i = match self.phase {
            Phase::Warmup => 0,
            Phase::Climbing => 1,
            Phase::Plateau => 2,
            Phase::Converged => 3,
        };
        self.multipliers[i]
    }
}

/// The entropy-aware predictive controller: KL EMAs, the phase, the PID, the threshold and the entropy gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Controller {
    pub kl_base_threshold: f64,
    pub entropy_floor: f64,
    pub penalty_coef: f64,
    /// EMA rates of the short and long KL trackers.
    pub kl_ema: [f64; 2],
    pub threshold_clamp: [f64; 2],
    /// Gate g = max(floor, H_floor/(H̄ + offset)).
    pub entropy_offset: f64,
    pub gate_floor: f64,
    pub kl_short: f64,
    pub kl_long: f64,
    pub pid: Pid,
    pub phase: PhaseDetector,
}

impl Default for Controller {
    fn default() -> Self {
        Self {
            kl_base_threshold: 0.3,
            entropy_floor: 2.0,
            penalty_coef: 0.1,
            kl_ema: [0.9, 0.99],
            threshold_clamp: [0.1, 0.6],
            entropy_offset: 0.1,
            gate_floor: 0.5,
            kl_short: 0.0,
            kl_long: 0.0,
            pid: Pid::default(),
            phase: PhaseDetector::default(),
        }
    }
}

/// One controller call's outputs (all logged).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlStep {
    /// k_s before this call's KL was folded in: the constant part of a differentiable penalty.
    pub kl_short_prev: f64,
    pub kl_short: f64,
    pub kl_long: f64,
    pub pid: f64,
    pub phi: f64,
    pub threshold: f64,
    pub gate: f64,
    pub penalty: f64,
    pub active: bool,
    pub phase: Phase,
}

impl Controller {
    /// The gate g = max(floor, H_floor/(H̄ + offset)).
    pub fn gate(&self, entropy: f64) -> f64 {
        self.gate_floor.max(self.entropy_floor / (entropy + self.entropy_offset))
    }

    /// One call with the current KL, the rollout's mean entropy H̄ and its mean raw reward r̄, in the official order:
    /// KL EMAs → phase → PID → threshold τ = clamp((τ_base + u)·φ) → P = coef·g·(k_s − τ)² if k_s > τ.
    pub fn step(&mut self, kl: f64, entropy: f64, reward: f64) -> ControlStep {
        let kl_short_prev = self.kl_short;
        self.kl_short = self.kl_ema[0] * self.kl_short + (1.0 - self.kl_ema[0]) * kl;
        self.kl_long = self.kl_ema[1] * self.kl_long + (1.0 - self.kl_ema[1]) * kl;
        let phase = self.phase.update(reward);
        let u = self.pid.update(reward);
        let phi = self.phase.multiplier();
        let threshold = ((self.kl_base_threshold + u) * phi).clamp(self.threshold_clamp[0], self.threshold_clamp[1]);
        let active = self.kl_short > threshold;
        let (gate, penalty) = if active {
            let g = self.gate(entropy);
            (g, self.penalty_coef * g * (self.kl_short - threshold).powi(2))
        } else {
            (1.0, 0.0)
        };
        ControlStep {
            kl_short_prev,
            kl_short: self.kl_short,
            kl_long: self.kl_long,
            pid: u,
            phi,
            threshold,
            gate,
            penalty,
            active,
            phase,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn soft_min_worked_examples() {
        let t = 1e-15;
        close(soft_min(0.5, 0.2, 0.3), 0.31396564791251674, t);
        close(soft_min(0.4, 0.4, 0.3), 0.4, t);
        close(soft_min(2.0, -1.0, 0.3), -0.7920694655017815, t);
        close(soft_min(0.5, 0.2, 0.5), 0.3278296150370298, t);
        close(soft_min(0.5, 0.2, 10.0), 0.34887504218496845, 1e-14);
        let (w1, w2) = soft_min_weights(0.5, 0.2, 0.3);
        close(w1, 0.26894142136999516, t);
        close(w2, 0.7310585786300049, t);
    }

    #[test]
    fn normalizer_advantage_and_value_loss_worked_examples() {
        let mut n = RewardNormalizer::default();
        let r1 = n.update_and_normalize(&[0.6, 0.8, 0.7, 0.9]);
        close(n.count, 4.0001, 1e-15);
        close(n.mean, 0.7499812504687382, 1e-15);
        close(n.var, 0.016705311182333406, 1e-15);
        let e1 = [-1.1604051607940657, 0.38699514046684225, -0.3867050101636122, 1.1606952910972959];
        for (x, e) in r1.iter().zip(e1) {
            close(*x, e, 1e-13);
        }
        let r2 = n.update_and_normalize(&[0.2, 1.0, 0.4, 0.6]);
        close(n.count, 8.0001, 1e-15);
        close(n.mean, 0.6499918751015612, 1e-15);
        close(n.var, 0.07668348930703552, 1e-15);
        for (x, e) in r2.iter().zip([-1.625001340499744, 1.263942092326439, -0.9027654822931983, -0.1805296240866526]) {
            close(*x, e, 1e-13);
        }
        // Advantages from batch 1's r̃ and heads (0.5, 0.2), (0.1, 0.3), (−0.2, 0.0), (0.0, 0.0), α = 0.3.
        let heads = [(0.5, 0.2), (0.1, 0.3), (-0.2, 0.0), (0.0, 0.0)];
        let v_old: Vec<f64> = heads.iter().map(|(a, b)| soft_min(*a, *b, 0.3)).collect();
        for (x, e) in v_old.iter().zip([0.31396564791251674, 0.18363312811236196, -0.11636687188763806, 0.0]) {
            close(*x, e, 1e-15);
        }
        let a = advantages(&r1, &v_old);
        for (x, e) in a.iter().zip([-1.2591790957433053, 0.27254509163681195, -0.1599301923761625, 1.1465641964826558])
        {
            close(*x, e, 1e-13);
        }
        // Value loss: V = [0.9, −0.3, 0.1, 0.0], clip 0.2, Huber δ 0.5 → 0.3821226460255006.
        close(value_loss(&[0.9, -0.3, 0.1, 0.0], &v_old, &r1, 0.2, 0.5), 0.3821226460255006, 1e-13);
        assert_eq!(advantages(&[1.0], &[0.0]), vec![0.0]);
        // The tensor loss SAFE trains with gives the same number, whole or summed over two micro-batches of 2.
        let dev = candle_core::Device::Cpu;
        let t = |x: &[f64]| Tensor::new(x.iter().map(|&v| v as f32).collect::<Vec<_>>(), &dev).unwrap();
        let v = [0.9, -0.3, 0.1, 0.0];
        let whole = value_loss_tensor(&t(&v), &t(&v_old), &t(&r1), 0.2, 0.5, 4).unwrap().to_scalar::<f32>().unwrap();
        close(whole as f64, 0.3821226460255006, 1e-6);
        let half = |r: std::ops::Range<usize>| {
            let l = value_loss_tensor(&t(&v[r.clone()]), &t(&v_old[r.clone()]), &t(&r1[r]), 0.2, 0.5, 4).unwrap();
            l.to_scalar::<f32>().unwrap() as f64
        };
        close(half(0..2) + half(2..4), 0.3821226460255006, 1e-6);
    }

    /// The tensor pieces SAFE's update differentiates against their f64 golden versions: soft-min (value and its
    /// gradient, the head weights) and Huber on both sides of δ (value and gradient: e inside, δ·sign(e) outside).
    #[test]
    fn soft_min_and_huber_tensors_match_the_golden_versions() {
        use candle_core::Var;
        let dev = candle_core::Device::Cpu;
        let (v1, v2) = (Var::new(&[0.5f32, 0.4, 2.0], &dev).unwrap(), Var::new(&[0.2f32, 0.4, -1.0], &dev).unwrap());
        let sm = soft_min_tensor(v1.as_tensor(), v2.as_tensor(), 0.3).unwrap();
        let got = sm.to_vec1::<f32>().unwrap();
        let grads = sm.sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (
            grads.get(v1.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            grads.get(v2.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        );
        for (i, (a, b)) in [(0.5, 0.2), (0.4, 0.4), (2.0, -1.0)].into_iter().enumerate() {
            close(got[i] as f64, soft_min(a, b, 0.3), 1e-6);
            let (w1, w2) = soft_min_weights(a, b, 0.3);
            close(g1[i] as f64, w1, 1e-6);
            close(g2[i] as f64, w2, 1e-6);
        }
        let e = Var::new(&[0.3f32, -0.3, 1.2, -2.0], &dev).unwrap();
        let h = huber_tensor(e.as_tensor(), 0.5).unwrap();
        let got = h.to_vec1::<f32>().unwrap();
        let g = h.sum_all().unwrap().backward().unwrap().get(e.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        // Huber_0.5: 0.3 → 0.045, −0.3 → 0.045, 1.2 → 0.5·(1.2 − 0.25) = 0.475, −2 → 0.5·(2 − 0.25) = 0.875.
        for (i, (x, golden, grad)) in
            [(0.3, 0.045, 0.3), (-0.3, 0.045, -0.3), (1.2, 0.475, 0.5), (-2.0, 0.875, -0.5)].into_iter().enumerate()
        {
            close(huber(x, 0.5), golden, 1e-15);
            close(got[i] as f64, golden, 1e-6);
            close(g[i] as f64, grad, 1e-6);
        }
    }

    #[test]
    fn controller_trajectory_worked_example() {
        // §1.9: three steps = six calls, defaults.
        let calls =
            [(3.0, 1.0, 0.5), (3.5, 1.0, 0.5), (4.0, 1.0, 0.6), (4.2, 1.0, 0.6), (5.0, 5.0, 0.7), (5.0, 5.0, 0.7)];
        #[rustfmt::skip]
        let expected = [
            (0.30000000000000004, 0.03, 0.0, 0.44999999999999996, 1.0, 0.0, false),
            (0.6200000000000001, 0.0647, -0.00036, 0.44945999999999997, 1.8181818181818181, 0.0052879802909091, true),
            (0.9580000000000002, 0.104053, 0.0014800000000000015, 0.45221999999999996, 1.8181818181818181, 0.04651152880000004, true),
            (1.2822000000000002, 0.14501247, 0.0011799999999999712, 0.4517699999999999, 1.8181818181818181, 0.1253843608909092, true),
            (1.6539800000000002, 0.1935623453, 0.0029445000000000152, 0.45441675000000004, 0.5, 0.07194759953752815, true),
            (1.9885820000000003, 0.241626721847, 0.002620274999999978, 0.4539304125, 0.5, 0.11775777475081357, true),
        ];
        let pid_after = [
            (0.5, 0.0, 0.0),
            (0.5, -0.001, -0.001),
            (0.505, 0.003, 0.004),
            (0.50975, 0.00675, 0.00375),
            (0.5192625, 0.0152625, 0.0085125),
            (0.528299375, 0.023299375, 0.008036875),
        ];
        let mut c = Controller::default();
        for (i, ((kl, h, r), e)) in calls.iter().zip(expected).enumerate() {
            let s = c.step(*kl, *h, *r);
            let t = 1e-12;
            close(s.kl_short, e.0, t);
            close(s.kl_long, e.1, t);
            close(s.pid, e.2, t);
            close(s.phi, 1.5, 0.0);
            close(s.threshold, e.3, t);
            close(s.gate, e.4, t);
            close(s.penalty, e.5, t);
            assert_eq!(s.active, e.6, "call {}", i + 1);
            assert_eq!(s.phase, Phase::Warmup);
            let (ema, integral, prev) = pid_after[i];
            close(c.pid.ema.unwrap(), ema, t);
            close(c.pid.integral, integral, t);
            close(c.pid.prev_error, prev, t);
        }
    }

    #[test]
    fn policy_loss_worked_example() {
        // 2 sequences × 3 tokens, A = [1.5, −0.8], logp_new − logp_old = [[0.1, 0.3, −0.05], [0.25, −0.3, masked]],
        // ε = 0.2, token mean over the 5 real tokens: −0.6434760361028699 (the shared PPO surrogate).
        use crate::algo::loss::{clipped_surrogate, ClipConfig};
        let clip = ClipConfig { eps_low: 0.2, eps_high: 0.2, delta: None };
        let rows = [(1.5, vec![0.1, 0.3, -0.05]), (-0.8, vec![0.25, -0.3])];
        let terms: Vec<f64> =
            rows.iter().flat_map(|(a, d)| d.iter().map(move |x| clipped_surrogate(f64::exp(*x), *a, &clip))).collect();
        close(terms.iter().sum::<f64>() / terms.len() as f64, -0.6434760361028699, 1e-15);
    }

    #[test]
    fn entropy_gate_and_phases() {
        let c = Controller::default();
        for (h, g) in
            [(0.0, 20.0), (1.0, 1.8181818181818181), (1.9, 1.0), (2.0, 0.9523809523809523), (3.9, 0.5), (5.0, 0.5)]
        {
            close(c.gate(h), g, 1e-15);
        }
        let run = |rs: &[f64]| {
            let mut p = PhaseDetector::default();
            rs.iter().for_each(|r| {
                p.update(*r);
            });
            (p.phase, p.multiplier())
        };
        assert_eq!(run(&[0.75; 50]), (Phase::Converged, 1.0));
        assert_eq!(run(&[0.5; 50]), (Phase::Plateau, 0.8));
        assert_eq!(run(&[[0.5; 50], [0.6; 50]].concat()), (Phase::Climbing, 1.2));
        assert_eq!(run(&[0.9; 49]), (Phase::Warmup, 1.5));
        let alternating: Vec<f64> = (0..50).map(|i| if i % 2 == 0 { 0.70 } else { 0.76 }).collect();
        assert_eq!(run(&alternating).0, Phase::Plateau);
        // Only the last 2·window rewards are kept.
        let mut p = PhaseDetector::default();
        (0..500).for_each(|i| {
            p.update(i as f64);
        });
        assert_eq!(p.history.len(), 100);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The SAFE step.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::loss::{clipped_surrogate_tensor, scalar, ClipConfig};
use crate::model::logprobs::{
    completion_logprobs, last_token_columns, logprobs_from_hidden, select_columns, Entropy, SequenceBatch,
};
use crate::model::value::SoftMinHeads;
use crate::model::CausalLm;
use crate::optim::{clip_grad_norm, norm_limit, AdamW, GradAccumulator};

choice_enum!(
    /// Where the critic reads the hidden state.
    #[derive(Default)]
    ValuePosition {
        /// The last real token of each sequence (`safe`'s default).
        #[default]
        LastValid = "last_valid",
        /// The last column of the padded batch, as the official code (a padding token for short completions).
        LastPadded = "last_padded",
    }
);

/// SAFE's hyperparameters that are not the controller's (those live in [`Controller`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SafeParams {
    pub alpha_softmin: f64,
    /// Passes over the whole batch per step (official E = 2).
    pub epochs: usize,
    pub clip: ClipConfig,
    pub value_clip: f64,
    pub huber_delta: f64,
    /// Weight of the value loss in the total (official 0.5).
    pub value_weight: f64,
    pub entropy_coef: f64,
    pub policy_max_grad_norm: f64,
    pub heads_max_grad_norm: f64,
    /// The KL penalty acts on the policy through a differentiable KL (`safe`'s default); `false` reproduces the
    /// official code, where it is a constant.
    pub kl_penalty_grad: bool,
    pub value_position: ValuePosition,
}

/// A SAFE step's configuration: the recipe's parameters plus what the trainer decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SafeConfig {
    pub params: SafeParams,
    pub micro_batch_size: usize,
    pub temperature: f64,
    pub pad_id: u32,
    pub logprob_chunk: usize,
}

/// What a SAFE step logs: losses and KL averaged over epochs, the controller of the last epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct SafeMetrics {
    pub pg_loss: f64,
    pub value_loss: f64,
    pub entropy_bonus: f64,
    pub kl: f64,
    pub rollout_entropy: f64,
    pub reward_raw_mean: f64,
    pub normalized_mean: f64,
    pub v1_mean: f64,
    pub v2_mean: f64,
    pub value_mean: f64,
    pub grad_norm: f64,
    pub heads_grad_norm: f64,
    pub control: Option<ControlStep>,
    /// Non-finite loss or grad norm: the step stopped before an optimizer step.
    pub failed: Option<String>,
}

/// One step's rollouts: one raw reward per completion.
pub struct SafeBatch<'a> {
    pub prompts: &'a [Vec<u32>],
    pub completions: &'a [Vec<u32>],
    pub rewards: &'a [f64],
}

/// Tensor [`soft_min`] of two value tensors (`[b]`), differentiable: −α·(logsumexp(−V1/α, −V2/α) − ln 2).
pub fn soft_min_tensor(v1: &Tensor, v2: &Tensor, alpha: f64) -> Result<Tensor> {
    let (a, b) = ((v1 / -alpha)?, (v2 / -alpha)?);
    let m = a.maximum(&b)?.detach();
    let lse = ((a.broadcast_sub(&m)?.exp()? + b.broadcast_sub(&m)?.exp()?)?.log()? + &m)?;
    Ok(((lse - std::f64::consts::LN_2)? * -alpha)?)
}

/// Tensor [`huber`]: q = min(|e|, δ), q·(|e| − q/2).
pub fn huber_tensor(e: &Tensor, delta: f64) -> Result<Tensor> {
    let abs = e.abs()?;
    let q = abs.minimum(delta)?;
    Ok((&q * (abs - (&q * 0.5)?)?)?)
}

/// Tensor [`value_loss`] of a micro-batch, as SAFE's update differentiates it: ½·Σ[Huber(V − r̃) + Huber(V_clip −
/// r̃)] / n with `n` the whole batch's size (micro-batches sum to the batch's loss). `v`, `v_old`, `target` `[b]`.
pub fn value_loss_tensor(
    v: &Tensor,
    v_old: &Tensor,
    target: &Tensor,
    clip: f64,
    delta: f64,
    n: usize,
) -> Result<Tensor> {
    let v_clip = super::loss::clipped_value_tensor(v, v_old, clip)?;
    let sum = (huber_tensor(&(v - target)?, delta)? + huber_tensor(&(&v_clip - target)?, delta)?)?.sum_all()?;
    Ok(((sum * 0.5)? / n as f64)?)
}

/// One SAFE step (algorithms.md §1.4): normalise the rewards, take rollout log-probs, reference log-probs, the
/// rollout entropy and V_old without a graph, whiten r̃ − V_old into advantages, then `epochs` passes over the whole
/// batch, each: controller call (KL, H̄, r̄) → L = L_pg + w_v·L_v + P − c_H·H → backward → clip policy and heads
/// separately → AdamW for both.
#[allow(clippy::too_many_arguments)]
pub fn safe_update(
    policy: &CausalLm,
    rollout_view: &CausalLm,
    reference: &CausalLm,
    heads: &SoftMinHeads,
    policy_opt: &mut AdamW,
    heads_opt: &mut AdamW,
    controller: &mut Controller,
    normalizer: &mut RewardNormalizer,
    batch: &SafeBatch,
    cfg: &SafeConfig,
) -> Result<SafeMetrics> {
    let n = batch.completions.len();
    if n < 2 || batch.prompts.len() != n || batch.rewards.len() != n {
        bail!("SAFE update: needs at least 2 completions with one prompt and one reward each");
    }
    if let Some(i) = batch.rewards.iter().position(|r| !r.is_finite()) {
        // A non-finite reward would poison the normaliser's running statistics for good.
        bail!("SAFE: reward {i} is {} (every completion needs a finite reward)", batch.rewards[i]);
    }
    let dev = policy.device();
    let micro = cfg.micro_batch_size.clamp(1, n);
    let width = batch.completions.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let chunks: Vec<Vec<usize>> = (0..n).collect::<Vec<_>>().chunks(micro).map(<[usize]>::to_vec).collect();
    let seqs = |idx: &[usize]| -> Result<SequenceBatch> {
        let p: Vec<Vec<u32>> = idx.iter().map(|&i| batch.prompts[i].clone()).collect();
        let c: Vec<Vec<u32>> = idx.iter().map(|&i| batch.completions[i].clone()).collect();
        SequenceBatch::with_width(&p, &c, cfg.pad_id, policy.config().sliding_window, dev, width)
    };
    let columns = |s: &SequenceBatch, idx: &[usize]| -> Vec<usize> {
        match cfg.params.value_position {
            ValuePosition::LastValid => {
                last_token_columns(s, &idx.iter().map(|&i| batch.completions[i].len()).collect::<Vec<_>>())
            }
            ValuePosition::LastPadded => vec![s.prompt_width + s.completion_width - 1; idx.len()],
        }
    };
    let total_tokens: f64 = batch.completions.iter().map(|c| c.len() as f64).sum::<f64>().max(1.0);

    // 1. Rewards → normalised targets.
    let normalized = normalizer.update_and_normalize(batch.rewards);
    let reward_raw_mean = batch.rewards.iter().sum::<f64>() / n as f64;

    // 2. Rollout-time quantities, no graph.
    let (mut old, mut refs, mut v_old, mut h_bar) = (Vec::new(), Vec::new(), Vec::new(), 0.0);
    let (mut v1s, mut v2s) = (0.0, 0.0);
    for idx in &chunks {
        let s = seqs(idx)?;
        let hidden = s.hidden(rollout_view)?;
        let (lp, ent) =
            logprobs_from_hidden(rollout_view, &hidden, &s, cfg.temperature, cfg.logprob_chunk, Entropy::Metric)?;
        let (rp, _) = logprobs_from_hidden(
            reference,
            &s.hidden(reference)?,
            &s,
            cfg.temperature,
            cfg.logprob_chunk,
            Entropy::None,
        )?;
        // H̄: per completion, the masked mean entropy; then the mean over completions.
        let ent = (ent.expect("requested") * &s.completion_mask)?.sum(1)?;
        let lens = s.completion_mask.sum(1)?.maximum(1.0)?;
        h_bar += scalar(&(ent / lens)?.sum_all()?)?;
        let (v1, v2) = heads.values(&select_columns(&hidden, &columns(&s, idx))?)?;
        let (v1, v2) = (v1.detach().to_vec1::<f32>()?, v2.detach().to_vec1::<f32>()?);
        for (a, b) in v1.iter().zip(&v2) {
            v_old.push(soft_min(*a as f64, *b as f64, cfg.params.alpha_softmin));
            v1s += *a as f64;
            v2s += *b as f64;
        }
        old.push(lp.detach());
        refs.push(rp.detach());
    }
    let h_bar = h_bar / n as f64;
    let adv = advantages(&normalized, &v_old);
    let mut m = SafeMetrics {
        pg_loss: 0.0,
        value_loss: 0.0,
        entropy_bonus: 0.0,
        kl: 0.0,
        rollout_entropy: h_bar,
        reward_raw_mean,
        normalized_mean: normalized.iter().sum::<f64>() / n as f64,
        v1_mean: v1s / n as f64,
        v2_mean: v2s / n as f64,
        value_mean: v_old.iter().sum::<f64>() / n as f64,
        grad_norm: 0.0,
        heads_grad_norm: 0.0,
        control: None,
        failed: None,
    };

    // 3. Epochs over the whole batch.
    let vars: Vec<(String, candle_core::Var)> = policy.vars().iter().chain(heads.vars()).cloned().collect();
    let pick = |src: &[f64], idx: &[usize]| -> Result<Tensor> {
        Ok(Tensor::from_vec(idx.iter().map(|&i| src[i] as f32).collect::<Vec<f32>>(), idx.len(), dev)?)
    };
    let k1 = |lp: &Tensor, rp: &Tensor, mask: &Tensor| -> Result<Tensor> { Ok(((lp - rp)? * mask)?.sum_all()?) };
    for epoch in 0..cfg.params.epochs {
        // The controller needs this epoch's KL before the backward when the penalty has a gradient: a graph-free pass.
        let mut control = None;
        if cfg.params.kl_penalty_grad {
            let mut kl_sum = 0.0;
            for (k, idx) in chunks.iter().enumerate() {
                let s = seqs(idx)?;
                // Before the first update the policy is the rollout policy: its log-probs are `old`.
                let lp = match epoch {
                    0 => old[k].clone(),
                    _ => completion_logprobs(rollout_view, &s, cfg.temperature, cfg.logprob_chunk, false)?.0,
                };
                kl_sum += scalar(&k1(&lp, &refs[k], &s.completion_mask)?)?;
            }
            control = Some(controller.step(kl_sum / total_tokens, h_bar, reward_raw_mean));
        }
        // dP/dKL_e for the differentiable penalty: P = c·g·(β·k_prev + (1 − β)·KL_e − τ)² while active.
        let penalty_slope = match control {
            Some(c) if c.active => {
                controller.penalty_coef * c.gate * 2.0 * (c.kl_short - c.threshold) * (1.0 - controller.kl_ema[0])
            }
            _ => 0.0,
        };
        let mut acc = GradAccumulator::new();
        let (mut kl_sum, mut pg_sum, mut vf_sum, mut ent_sum) = (0.0, 0.0, 0.0, 0.0);
        for (k, idx) in chunks.iter().enumerate() {
            let s = seqs(idx)?;
            let hidden = s.hidden(policy)?;
            let (lp, ent) =
                logprobs_from_hidden(policy, &hidden, &s, cfg.temperature, cfg.logprob_chunk, Entropy::Differentiable)?;
            let mask = &s.completion_mask;
            let ratio = (&lp - &old[k])?.exp()?;
            let pg = ((clipped_surrogate_tensor(&ratio, &pick(&adv, idx)?, &cfg.params.clip)? * mask)?.sum_all()?
                / total_tokens)?;
            let (v1, v2) = heads.values(&select_columns(&hidden, &columns(&s, idx))?)?;
            let v = soft_min_tensor(&v1, &v2, cfg.params.alpha_softmin)?;
            let (vo, target) = (pick(&v_old, idx)?, pick(&normalized, idx)?);
            let vf = value_loss_tensor(&v, &vo, &target, cfg.params.value_clip, cfg.params.huber_delta, n)?;
            // H_e: the mean over every position of the completion tensor, padding included (official).
            let h = (ent.expect("requested").sum_all()? / (n * width) as f64)?;
            let kl = k1(&lp, &refs[k], mask)?;
            let mut loss = ((&pg + (&vf * cfg.params.value_weight)?)? - (&h * cfg.params.entropy_coef)?)?;
            if penalty_slope != 0.0 {
                loss = (loss + ((&kl / total_tokens)? * penalty_slope)?)?;
            }
            let value = scalar(&loss)?;
            if !value.is_finite() {
                m.failed = Some(format!("the loss is {value}"));
                return Ok(m);
            }
            acc.add(loss.backward()?, &vars)?;
            kl_sum += scalar(&kl)?;
            pg_sum += scalar(&pg)?;
            vf_sum += scalar(&vf)?;
            ent_sum += scalar(&h)?;
        }
        let kl_e = kl_sum / total_tokens;
        let control = match control {
            Some(c) => c,
            None => controller.step(kl_e, h_bar, reward_raw_mean),
        };
        let mut grads = acc.finish();
        let gp = clip_grad_norm(&mut grads, policy.vars(), norm_limit(cfg.params.policy_max_grad_norm))?;
        let gh = clip_grad_norm(&mut grads, heads.vars(), norm_limit(cfg.params.heads_max_grad_norm))?;
        if !gp.is_finite() || !gh.is_finite() {
            m.failed = Some(format!("the gradient norm is {gp} (policy) / {gh} (critic heads)"));
            return Ok(m);
        }
        policy_opt.step(&grads)?;
        heads_opt.step(&grads)?;
        let e = cfg.params.epochs as f64;
        m.pg_loss += pg_sum / e;
        m.value_loss += vf_sum / e;
        m.entropy_bonus += ent_sum / e;
        m.kl += kl_e / e;
        m.grad_norm += gp / e;
        m.heads_grad_norm += gh / e;
        m.control = Some(control);
    }
    Ok(m)
}

// ---------------------------------------------------------------------------------------------------------------
// The algorithm: settings, critic heads, controller and normaliser.

use super::boundary::{Algorithm, Models, Needs, Runtime, StepBatch, TensorFileReader, TensorFiles};
use super::critic::{actor_critic_lr, Critic, CriticParams, CriticState};
use super::{Keys, Problem, RecipeShape, Setup, StepOutcome};
use crate::metrics::{names, Record};

/// SAFE's settings: `algorithm.safe.*`, the shared clip and value-clip keys, `critic.lr` for the heads, and the
/// controller's and normaliser's constants (their state starts empty).
#[derive(Debug, Clone, PartialEq)]
pub struct SafeSettings {
    pub params: SafeParams,
    /// The controller before the first step: its constants, an empty state.
    pub controller: Controller,
    pub normalizer: RewardNormalizer,
    /// `critic.lr` and `algorithm.safe.heads_max_grad_norm`.
    pub critic: CriticParams,
}

impl Default for SafeParams {
    fn default() -> Self {
        Self {
            alpha_softmin: 0.3,
            epochs: 2,
            clip: ClipConfig::default(),
            value_clip: 0.2,
            huber_delta: 0.5,
            value_weight: 0.5,
            entropy_coef: 0.01,
            policy_max_grad_norm: 1.0,
            heads_max_grad_norm: 0.5,
            kl_penalty_grad: true,
            value_position: ValuePosition::LastValid,
        }
    }
}

impl Default for SafeSettings {
    fn default() -> Self {
        let params = SafeParams::default();
        Self {
            critic: CriticParams { lr: CriticParams::default().lr, max_grad_norm: params.heads_max_grad_norm },
            params,
            controller: Controller::default(),
            normalizer: RewardNormalizer::default(),
        }
    }
}

impl SafeSettings {
    pub fn from_keys(k: &dyn Keys) -> Self {
        let f = |name: &str| k.float(&format!("algorithm.safe.{name}"));
        let params = SafeParams {
            alpha_softmin: f("alpha_softmin"),
            epochs: k.usize("algorithm.safe.epochs"),
            clip: ClipConfig::from_keys(k),
            value_clip: k.float("algorithm.value_clip"),
            huber_delta: f("huber_delta"),
            value_weight: f("value_weight"),
            entropy_coef: f("entropy_coef"),
            policy_max_grad_norm: k.float("optim.max_grad_norm"),
            heads_max_grad_norm: f("heads_max_grad_norm"),
            kl_penalty_grad: k.boolean("algorithm.safe.kl_penalty_grad"),
            value_position: k.choice("algorithm.safe.value_position", ValuePosition::from_name),
        };
        let controller = Controller {
            kl_base_threshold: f("kl_base_threshold"),
            entropy_floor: f("entropy_floor"),
            penalty_coef: f("penalty_coef"),
            kl_ema: [f("kl_ema_short"), f("kl_ema_long")],
            threshold_clamp: [f("threshold_min"), f("threshold_max")],
            entropy_offset: f("entropy_offset"),
            gate_floor: f("gate_floor"),
            kl_short: 0.0,
            kl_long: 0.0,
            pid: Pid {
                kp: f("pid_kp"),
                ki: f("pid_ki"),
                kd: f("pid_kd"),
                reward_ema: f("reward_ema"),
                target_velocity: f("target_velocity"),
                integral_clamp: f("integral_clamp"),
                ema: None,
                integral: 0.0,
                prev_error: 0.0,
            },
            phase: PhaseDetector {
                window: k.usize("algorithm.safe.phase_window"),
                climb_margin: f("climb_margin"),
                converge_std: f("converge_std"),
                converge_min: f("converge_min"),
                multipliers: [f("phi_warmup"), f("phi_climbing"), f("phi_plateau"), f("phi_converged")],
                history: Vec::new(),
                phase: Phase::Warmup,
            },
        };
        let normalizer =
            RewardNormalizer { count: f("reward_norm_init_count"), mean: 0.0, var: 1.0, eps: f("reward_norm_eps") };
        let critic = CriticParams { lr: k.float("critic.lr"), max_grad_norm: params.heads_max_grad_norm };
        Self { params, controller, normalizer, critic }
    }

    pub fn needs(&self) -> Needs {
        // The KL is to the starting policy whatever the penalty's state; the entropy bonus is differentiable.
        Needs { reference: true, entropy_gradient: true, ..Needs::default() }
    }

    pub fn summary(&self) -> String {
        let p = &self.params;
        format!(
            "epsilon {}/{}, epochs {}, alpha_softmin {}, kl_base_threshold {}, penalty_coef {}",
            p.clip.eps_low,
            p.clip.eps_high,
            p.epochs,
            p.alpha_softmin,
            self.controller.kl_base_threshold,
            self.controller.penalty_coef
        )
    }

    pub fn problems(&self, shape: &RecipeShape) -> Vec<Problem> {
        if shape.completions_per_step() < 2 {
            return vec![Problem::at(
                "rollout.prompts_per_step",
                "safe whitens advantages over the step's completions: rollout.prompts_per_step × \
                 rollout.num_generations must be at least 2",
            )];
        }
        Vec::new()
    }
}

/// SAFE's state between steps besides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SafeState {
    pub controller: Controller,
    pub normalizer: RewardNormalizer,
    pub critic: CriticState,
}

/// SAFE: soft-min critic heads on the policy's trunk, the reward normaliser, the entropy-gated PID controller.
pub struct Safe {
    settings: SafeSettings,
    heads: Critic<SoftMinHeads>,
    controller: Controller,
    normalizer: RewardNormalizer,
}

impl Safe {
    pub fn new(settings: SafeSettings, setup: &Setup) -> Result<Self> {
        let heads = SoftMinHeads::new(setup.policy.hidden_size, setup.seed, setup.device)?;
        let heads = Critic::new(heads, settings.critic.clone(), setup.optim)?;
        let (controller, normalizer) = (settings.controller.clone(), settings.normalizer);
        Ok(Self { settings, heads, controller, normalizer })
    }
}

impl Algorithm for Safe {
    /// One SAFE step: the controller and normaliser advance; their internals are logged.
    fn update(
        &mut self,
        m: Models,
        batch: &StepBatch,
        _advantages: Option<&[f64]>,
        rt: &Runtime,
        record: &mut Record,
    ) -> Result<StepOutcome> {
        let cfg = SafeConfig {
            params: self.settings.params,
            micro_batch_size: rt.micro_batch_size,
            temperature: rt.temperature,
            pad_id: rt.pad_id,
            logprob_chunk: rt.logprob_chunk,
        };
        let (prompts, completions) = batch.token_ids();
        let total = &batch.scored.total;
        if let Some(i) = total.iter().position(|r| r.is_nan()) {
            let reason = format!("no reward applied to completion {i}; safe needs one reward per completion");
            return Ok(StepOutcome::skipped("reward", reason));
        }
        let lr = actor_critic_lr(rt, m.optimizer, &mut self.heads);
        // Work on copies: a step that fails leaves the controller and normaliser as they were.
        let (mut controller, mut normalizer) = (self.controller.clone(), self.normalizer);
        let reference = m.reference.context("safe needs the reference model")?;
        let safe_batch = SafeBatch { prompts: &prompts, completions: &completions, rewards: total };
        let heads = &mut self.heads;
        let u = safe_update(
            m.policy,
            m.rollout_view,
            reference,
            &heads.model,
            m.optimizer,
            &mut heads.optimizer,
            &mut controller,
            &mut normalizer,
            &safe_batch,
            &cfg,
        )?;
        if let Some(reason) = u.failed {
            return Ok(StepOutcome::skipped("loss", reason));
        }
        (self.controller, self.normalizer) = (controller, normalizer);
        let c = u.control.expect("at least one epoch");
        let phase = match c.phase {
            Phase::Warmup => 0.0,
            Phase::Climbing => 1.0,
            Phase::Plateau => 2.0,
            Phase::Converged => 3.0,
        };
        let p = &cfg.params;
        for (name, v) in [
            (names::KL, u.kl),
            (names::ENTROPY, u.rollout_entropy),
            (names::LOSS, u.pg_loss + p.value_weight * u.value_loss + c.penalty - p.entropy_coef * u.entropy_bonus),
            (names::PPO_LOSS_POLICY, u.pg_loss),
            (names::PPO_LOSS_VALUE, u.value_loss),
            (names::GRAD_NORM, u.grad_norm),
            (names::CRITIC_GRAD_NORM, u.heads_grad_norm),
            (names::LEARNING_RATE, lr),
            (names::SAFE_KL_SHORT, c.kl_short),
            (names::SAFE_KL_LONG, c.kl_long),
            (names::SAFE_PID, c.pid),
            (names::SAFE_PHASE, phase),
            (names::SAFE_PHI, c.phi),
            (names::SAFE_THRESHOLD, c.threshold),
            (names::SAFE_ENTROPY_FACTOR, c.gate),
            (names::SAFE_PENALTY, c.penalty),
            (names::SAFE_ACTIVE, c.active as u8 as f64),
            (names::SAFE_ENTROPY_BONUS, u.entropy_bonus),
            (names::SAFE_V1_MEAN, u.v1_mean),
            (names::SAFE_V2_MEAN, u.v2_mean),
            (names::SAFE_VALUE_MEAN, u.value_mean),
            (names::SAFE_NORMALIZED_REWARD, u.normalized_mean),
        ] {
            record.set(name, v);
        }
        Ok(StepOutcome::Trained)
    }

    fn state(&self) -> Result<serde_json::Value> {
        let s =
            SafeState { controller: self.controller.clone(), normalizer: self.normalizer, critic: self.heads.state() };
        Ok(serde_json::to_value(s)?)
    }

    fn tensor_files(&self) -> TensorFiles {
        self.heads.tensor_files()
    }

    fn restore(&mut self, state: &serde_json::Value, files: TensorFileReader) -> Result<()> {
        let s: SafeState = super::boundary::parse_state(state, "safe")?;
        (self.controller, self.normalizer) = (s.controller, s.normalizer);
        self.heads.restore(&s.critic, files)
    }
}
