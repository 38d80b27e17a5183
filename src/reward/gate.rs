//! G-RA gates (Gated Reward Accumulation, arXiv 2508.10548; ../shared/algorithms.md §5): a reward with
//! `gate = { on = "<other reward>", min = δ }` counts only for samples where the other reward's raw value is ≥ δ, and
//! only if that reward's own gate (if any) is open too: G_i = 1[r_j ≥ δ_i]·G_j. A gated-off reward contributes 0 (it
//! still counts in the group statistics; it is not "not applicable"). A gating value that is missing (None) closes
//! the gate. Values are validated before gates are applied, so a NaN behind a closed gate still stops the step.

use anyhow::{bail, Result};

/// Reward `i`'s gate: open where reward `on`'s raw value is ≥ `min` (and `on`'s own gate is open).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gate {
    pub on: usize,
    pub min: f64,
}

/// Check that gates name existing rewards and form no cycle (a reward gating itself included). `names` are for
/// messages.
pub fn check_gates(gates: &[Option<Gate>], names: &[&str]) -> Result<()> {
    for (i, g) in gates.iter().enumerate() {
        let Some(g) = g else { continue };
        if g.on >= gates.len() {
            bail!("reward `{}` is gated on reward #{} which does not exist", names[i], g.on);
        }
        // Follow the chain; more hops than rewards means a cycle.
        let (mut at, mut hops) = (i, 0);
        while let Some(next) = gates[at] {
            at = next.on;
            hops += 1;
            if at == i || hops > gates.len() {
                let what =
                    if g.on == i { "itself".to_string() } else { "a chain of gates that comes back to it".into() };
                bail!("reward `{}` is gated on {what}: gates must not form a cycle", names[i]);
            }
        }
    }
    Ok(())
}

/// Each reward's values after gating, and per reward the fraction of samples whose gate was open.
pub type Gated = (Vec<Vec<Option<f64>>>, Vec<Option<f64>>);

/// Apply the gates to each reward's raw values (`values[reward][sample]`): gated-off values become `Some(0.0)`.
/// Also returns, per reward, the fraction of samples whose gate was open (`None` for ungated rewards).
pub fn apply_gates(values: &[Vec<Option<f64>>], gates: &[Option<Gate>]) -> Result<Gated> {
    if values.len() != gates.len() {
        bail!("{} rewards but {} gate settings", values.len(), gates.len());
    }
    let n = values.first().map_or(0, Vec::len);
    // open(i, s): whether every gate on i's chain is open for sample s. Chains are acyclic (checked).
    let open = |i: usize, s: usize| -> bool {
        let mut at = i;
        while let Some(g) = gates[at] {
            match values[g.on][s] {
                Some(v) if v >= g.min => at = g.on,
                _ => return false,
            }
        }
        true
    };
    let labels: Vec<String> = (0..gates.len()).map(|i| format!("#{i}")).collect();
    check_gates(gates, &labels.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut out = values.to_vec();
    let mut frac = vec![None; gates.len()];
    for i in 0..gates.len() {
        if gates[i].is_none() {
            continue;
        }
        let mut opened = 0;
        for (s, v) in out[i].iter_mut().enumerate() {
            if open(i, s) {
                opened += 1;
            } else {
                *v = Some(0.0);
            }
        }
        frac[i] = Some(if n == 0 { f64::NAN } else { opened as f64 / n as f64 });
    }
    Ok((out, frac))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weighted(values: &[Vec<Option<f64>>], weights: &[f64], s: usize) -> f64 {
        values.iter().zip(weights).filter_map(|(v, w)| v[s].map(|x| w * x)).sum()
    }

    #[test]
    fn single_turn_chain_worked_example() {
        // algorithms.md §5.5: correct (w 1.0), format (w 0.5, gated on correct ≥ 1), brevity (w 0.2, gated on
        // format ≥ 1). (1, 1, 0.8) → 1 + 0.5 + 0.16 = 1.66; (0, 1, 0.8) → 0 (ungated 0.66); (1, 0, 0.8) → 1.0
        // (brevity's gate is format's value 0 < 1; ungated 1.16); (0, 0, 0) → 0.
        let samples = [(1.0, 1.0, 0.8), (0.0, 1.0, 0.8), (1.0, 0.0, 0.8), (0.0, 0.0, 0.0)];
        let values: Vec<Vec<Option<f64>>> = vec![
            samples.iter().map(|s| Some(s.0)).collect(),
            samples.iter().map(|s| Some(s.1)).collect(),
            samples.iter().map(|s| Some(s.2)).collect(),
        ];
        let gates = [None, Some(Gate { on: 0, min: 1.0 }), Some(Gate { on: 1, min: 1.0 })];
        let (gated, frac) = apply_gates(&values, &gates).unwrap();
        let w = [1.0, 0.5, 0.2];
        let totals: Vec<f64> = (0..4).map(|s| weighted(&gated, &w, s)).collect();
        assert!((totals[0] - 1.66).abs() < 1e-12, "{totals:?}");
        assert_eq!(&totals[1..], &[0.0, 1.0, 0.0]);
        let ungated: Vec<f64> = (0..4).map(|s| weighted(&values, &w, s)).collect();
        assert!((ungated[1] - 0.66).abs() < 1e-12 && (ungated[2] - 1.16).abs() < 1e-12);
        // format's gate opens for samples 0 and 2; brevity's only for sample 0 (its chain needs correct too).
        assert_eq!(frac, vec![None, Some(0.5), Some(0.25)]);
    }

    #[test]
    fn two_level_worked_example() {
        // §5.5: outcome r_high always counts; the summed immediate rewards count iff r_high ≥ δ.
        let high = [1.0, 0.0, -0.5, -1.0];
        let immediate: [f64; 4] = [0.1 + 0.2 + -0.05, 0.1 + 0.2 + 0.3, 0.3 + 0.3, 0.4 + 0.4 + 0.4];
        let values = vec![high.iter().map(|&x| Some(x)).collect(), immediate.iter().map(|&x| Some(x)).collect()];
        let expect = [(0.0, [1.25, 0.6000000000000001, -0.5, -1.0]), (1.0, [1.25, 0.0, -0.5, -1.0])];
        for (delta, totals) in expect {
            let (gated, _) = apply_gates(&values, &[None, Some(Gate { on: 0, min: delta })]).unwrap();
            for (s, t) in totals.iter().enumerate() {
                assert_eq!(weighted(&gated, &[1.0, 1.0], s), *t, "δ = {delta}, trajectory {}", s + 1);
            }
        }
        // D-RA (no gate): T3 and T4 earn positive totals from immediate rewards alone.
        let d_ra: Vec<f64> = (0..4).map(|s| weighted(&values, &[1.0, 1.0], s)).collect();
        assert_eq!(d_ra, vec![1.25, 0.6000000000000001, 0.09999999999999998, 0.20000000000000018]);
    }

    #[test]
    fn missing_gating_value_closes_and_cycles_are_rejected() {
        let values = vec![vec![None, Some(2.0)], vec![Some(0.5), None]];
        let (gated, frac) = apply_gates(&values, &[None, Some(Gate { on: 0, min: 1.0 })]).unwrap();
        // Sample 0: the gating value is missing → closed → 0. Sample 1: open, and "not applicable" stays None.
        assert_eq!(gated[1], vec![Some(0.0), None]);
        assert_eq!(frac[1], Some(0.5));
        let names = ["a", "b", "c"];
        let own = [Some(Gate { on: 0, min: 0.0 }), None, None];
        assert!(check_gates(&own, &names).unwrap_err().to_string().contains("`a` is gated on itself"));
        let cycle = [Some(Gate { on: 2, min: 0.0 }), Some(Gate { on: 0, min: 0.0 }), Some(Gate { on: 1, min: 0.0 })];
        assert!(check_gates(&cycle, &names).unwrap_err().to_string().contains("cycle"));
        assert!(check_gates(&[None, Some(Gate { on: 0, min: 1.0 }), Some(Gate { on: 1, min: 1.0 })], &names).is_ok());
    }
}
