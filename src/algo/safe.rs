//! SAFE (arXiv 2602.04651; ../shared/algorithms.md §1): a sequence-level actor-critic with a pessimistic double
//! soft-min critic, a reward normaliser, and an entropy-gated KL penalty whose threshold a PID controller on the
//! reward's velocity moves. This file holds the numbers: each piece is a pure function or a small state machine whose
//! whole state is serialisable (checkpointed), tested against §1.9's worked examples.

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
        let v_clip = v_old[i] + (v[i] - v_old[i]).clamp(-clip, clip);
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
