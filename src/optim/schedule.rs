//! Learning-rate schedules with transformers' semantics (`get_{constant,linear,cosine}_schedule_with_warmup`).
//!
//! `step` is the number of optimizer steps already taken (0 for the first update, as the HF Trainer steps its
//! scheduler after the optimizer): during warm-up lr = base·step/warmup, so the very first update uses lr 0 when
//! warm-up is on.

choice_enum!(
/// Shape of the learning rate after warm-up.
    #[derive(Default)]
    LrSchedule {
        /// base lr throughout.
        Constant = "constant",
        /// Linear decay from base at the end of warm-up to 0 at `max_steps` (transformers' default).
        #[default]
        Linear = "linear",
        /// Half a cosine from base to 0 at `max_steps` (num_cycles 0.5).
        Cosine = "cosine",
    }
);

/// The learning rate for the update after `step` steps, with `warmup_steps` of linear warm-up and `max_steps` in all.
pub fn lr_at(step: u64, base_lr: f64, schedule: LrSchedule, warmup_steps: u64, max_steps: u64) -> f64 {
    if step < warmup_steps {
        return base_lr * step as f64 / warmup_steps.max(1) as f64;
    }
    let remaining = max_steps.saturating_sub(warmup_steps).max(1) as f64;
    let factor = match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Linear => (max_steps as f64 - step as f64) / remaining,
        LrSchedule::Cosine => {
            let progress = (step - warmup_steps) as f64 / remaining;
            0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())
        }
    };
    base_lr * factor.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-15, "{a} vs {b}");
    }

    #[test]
    fn schedule_golden() {
        // base 1e-3, warmup 2, max 10: warm-up 0, 5e-4 at steps 0, 1 in every schedule.
        for s in [LrSchedule::Constant, LrSchedule::Linear, LrSchedule::Cosine] {
            close(lr_at(0, 1e-3, s, 2, 10), 0.0);
            close(lr_at(1, 1e-3, s, 2, 10), 5e-4);
        }
        close(lr_at(2, 1e-3, LrSchedule::Constant, 2, 10), 1e-3);
        close(lr_at(9, 1e-3, LrSchedule::Constant, 2, 10), 1e-3);
        // linear: (10 − s)/8 → s=2: 1e-3, s=6: 4/8 = 5e-4, s=9: 1/8 = 1.25e-4, s=10 and beyond: 0.
        close(lr_at(2, 1e-3, LrSchedule::Linear, 2, 10), 1e-3);
        close(lr_at(6, 1e-3, LrSchedule::Linear, 2, 10), 5e-4);
        close(lr_at(9, 1e-3, LrSchedule::Linear, 2, 10), 1.25e-4);
        close(lr_at(12, 1e-3, LrSchedule::Linear, 2, 10), 0.0);
        // cosine: progress (s − 2)/8; s=4: 0.5·(1 + cos(π/4)) = 0.8535533905932737; s=6: 0.5·(1 + cos(π/2)) = 0.5
        // (cos(π/2) = 6.1e-17 in f64); s=10: 0.5·(1 + cos π) = 0.
        close(lr_at(4, 1e-3, LrSchedule::Cosine, 2, 10), 1e-3 * 0.8535533905932737);
        close(lr_at(6, 1e-3, LrSchedule::Cosine, 2, 10), 5e-4);
        close(lr_at(10, 1e-3, LrSchedule::Cosine, 2, 10), 0.0);
        // No warm-up: the first step uses the full base lr.
        close(lr_at(0, 1e-3, LrSchedule::Linear, 0, 10), 1e-3);
    }
}
