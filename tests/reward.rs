//! The reward pipeline: weighted NaN-aware sums, metrics, and the errors that stop a step.

use anyhow::Result;
use safe::recipe::{RewardSettings, RewardSource as Settings, Rule};
use safe::reward::{RewardInput, RewardPipeline, RewardSource};
use safe::rollout::FinishReason;
use serde_json::{json, Map, Value};

/// A source that returns fixed values.
struct Fixed(&'static str, Vec<Option<f64>>);

impl RewardSource for Fixed {
    fn name(&self) -> &str {
        self.0
    }
    fn score(&self, _: &[RewardInput]) -> Result<Vec<Option<f64>>> {
        Ok(self.1.clone())
    }
}

fn fixed(name: &'static str, v: &[Option<f64>], w: f64) -> (Box<dyn RewardSource>, f64) {
    (Box::new(Fixed(name, v.to_vec())), w)
}

fn batch<'a>(completions: &[&'a str], columns: &'a Map<String, Value>) -> Vec<RewardInput<'a>> {
    completions
        .iter()
        .map(|c| RewardInput {
            prompt: "q",
            raw_prompt: None,
            completion: c,
            completion_ids: &[],
            finish: FinishReason::Eos,
            columns,
        })
        .collect()
}

fn metric(m: &[(String, f64)], name: &str) -> f64 {
    m.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no metric {name}")).1
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn weighted_sum_skips_none_and_all_none_is_nan() {
    // a (w 1.0) = [1, None, 0.5, None], b (w 0.5) = [0, 1, None, None]
    // total = [1·1 + 0.5·0, 0.5·1, 1·0.5, NaN] = [1.0, 0.5, 0.5, NaN]
    let p = RewardPipeline::new(vec![
        fixed("a", &[Some(1.0), None, Some(0.5), None], 1.0),
        fixed("b", &[Some(0.0), Some(1.0), None, None], 0.5),
    ])
    .unwrap();
    let cols = Map::new();
    let out = p.score(&batch(&["", "", "", ""], &cols)).unwrap();
    assert_eq!(&out.total[..3], &[1.0, 0.5, 0.5]);
    assert!(out.total[3].is_nan());
    assert_eq!(out.per_reward[1], ("b".to_string(), vec![Some(0.0), Some(1.0), None, None]));

    // Metrics, unbiased std over the non-None values:
    // a: {1, 0.5}: mean 0.75, var_u = (0.25² + 0.25²)/1 = 0.125, std 0.3535533905932738
    // b: {0, 1}: mean 0.5, var_u = 0.5, std 0.7071067811865476
    // reward over non-NaN totals {1, 0.5, 0.5}: mean 2/3, var_u = ((1/3)² + 2·(1/6)²)/2 = 1/12, std 0.28867513459481287
    let m = &out.metrics;
    let names: Vec<_> = m.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["rewards/a/mean", "rewards/a/std", "rewards/b/mean", "rewards/b/std", "reward", "reward_std"]);
    assert!(close(metric(m, "rewards/a/mean"), 0.75));
    assert!(close(metric(m, "rewards/a/std"), 0.3535533905932738));
    assert!(close(metric(m, "rewards/b/mean"), 0.5));
    assert!(close(metric(m, "rewards/b/std"), std::f64::consts::FRAC_1_SQRT_2));
    assert!(close(metric(m, "reward"), 2.0 / 3.0));
    assert!(close(metric(m, "reward_std"), 0.28867513459481287));
}

#[test]
fn undefined_metrics_are_nan() {
    // Only one value for `a`: std undefined; `b` has none: mean and std undefined.
    let p = RewardPipeline::new(vec![fixed("a", &[Some(2.0), None], 1.0), fixed("b", &[None, None], 1.0)]).unwrap();
    let cols = Map::new();
    let out = p.score(&batch(&["", ""], &cols)).unwrap();
    assert_eq!(metric(&out.metrics, "rewards/a/mean"), 2.0);
    assert!(metric(&out.metrics, "rewards/a/std").is_nan());
    assert!(metric(&out.metrics, "rewards/b/mean").is_nan());
    assert_eq!(metric(&out.metrics, "reward"), 2.0);
    assert!(metric(&out.metrics, "reward_std").is_nan());
}

#[test]
fn non_finite_value_is_an_error_naming_reward_and_sample() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        // Even with weight 0, where the value would not reach the sum.
        let p = RewardPipeline::new(vec![
            fixed("ok", &[Some(1.0); 3], 1.0),
            fixed("rm", &[Some(0.1), None, Some(bad)], 0.0),
        ])
        .unwrap();
        let cols = Map::new();
        let err = p.score(&batch(&["", "", ""], &cols)).unwrap_err().to_string();
        assert!(err.contains("`rm`") && err.contains("sample 2"), "{err}");
    }
}

#[test]
fn wrong_length_is_an_error_naming_reward() {
    let p = RewardPipeline::new(vec![fixed("ok", &[Some(1.0); 2], 1.0), fixed("short", &[Some(1.0)], 1.0)]).unwrap();
    let cols = Map::new();
    let err = p.score(&batch(&["", ""], &cols)).unwrap_err().to_string();
    assert!(err.contains("`short`") && err.contains("1 values") && err.contains("2 samples"), "{err}");
}

#[test]
fn source_error_names_reward() {
    struct Failing;
    impl RewardSource for Failing {
        fn name(&self) -> &str {
            "server"
        }
        fn score(&self, _: &[RewardInput]) -> Result<Vec<Option<f64>>> {
            anyhow::bail!("connection refused")
        }
    }
    let p = RewardPipeline::new(vec![fixed("ok", &[Some(1.0)], 1.0), (Box::new(Failing), 1.0)]).unwrap();
    let cols = Map::new();
    let err = format!("{:#}", p.score(&batch(&[""], &cols)).unwrap_err());
    assert!(err.contains("`server`") && err.contains("connection refused"), "{err}");
}

#[test]
fn bad_pipelines_are_rejected() {
    assert!(RewardPipeline::new(vec![]).is_err());
    assert!(RewardPipeline::new(vec![fixed("a", &[], 1.0), fixed("a", &[], 1.0)]).is_err());
    assert!(RewardPipeline::new(vec![fixed("a", &[], f64::NAN)]).is_err());
}

#[test]
fn from_settings_rule_rewards_end_to_end() {
    let settings = [
        RewardSettings {
            name: "correct".into(),
            weight: 1.0,
            source: Settings::Rule(Rule::ExactAnswer { field: "answer".into() }),
            gate: None,
        },
        RewardSettings {
            name: "format".into(),
            weight: 0.5,
            source: Settings::Rule(Rule::Regex { pattern: r"answer is -?\d".into() }),
            gate: None,
        },
        RewardSettings {
            name: "polite".into(),
            weight: -0.25,
            source: Settings::Rule(Rule::Contains { text: "sorry".into() }),
            gate: None,
        },
    ];
    let p = RewardPipeline::from_settings(&settings, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    assert_eq!(p.names().collect::<Vec<_>>(), ["correct", "format", "polite"]);
    let cols = json!({"answer": "1,234"}).as_object().unwrap().clone();
    // 1: correct 1, format 1, polite 0 → 1 + 0.5 = 1.5
    // 2: correct 0 (last number 3), format 0, polite 1 → −0.25
    // 3: correct 1, format 0, polite 0 → 1.0
    let out = p.score(&batch(&["The answer is 1,234.", "sorry, 3", "1234"], &cols)).unwrap();
    assert_eq!(out.total, vec![1.5, -0.25, 1.0]);
    assert!(close(metric(&out.metrics, "rewards/correct/mean"), 2.0 / 3.0));

    let missing = Map::new();
    let err = format!("{:#}", p.score(&batch(&["1"], &missing)).unwrap_err());
    assert!(err.contains("`answer`") && err.contains("`correct`"), "{err}");
}

#[test]
fn gates_zero_gated_off_rewards_after_validation_and_log_gate_open() {
    // algorithms.md §5.5's chain: correct (w 1), format (w 0.5, gated on correct ≥ 1), brevity (w 0.2, gated on
    // format ≥ 1), for (1, 1, 0.8), (0, 1, 0.8), (1, 0, 0.8), (0, 0, 0) → 1.66, 0, 1.0, 0.
    let mut p = RewardPipeline::new(vec![
        fixed("correct", &[Some(1.0), Some(0.0), Some(1.0), Some(0.0)], 1.0),
        fixed("format", &[Some(1.0), Some(1.0), Some(0.0), Some(0.0)], 0.5),
        fixed("brevity", &[Some(0.8), Some(0.8), Some(0.8), Some(0.0)], 0.2),
    ])
    .unwrap();
    p.set_gates(&[None, Some(("correct", 1.0)), Some(("format", 1.0))]).unwrap();
    let cols = Map::new();
    let s = p.score(&batch(&["a", "b", "c", "d"], &cols)).unwrap();
    assert!(close(s.total[0], 1.66) && s.total[1..] == [0.0, 1.0, 0.0], "{:?}", s.total);
    assert_eq!(metric(&s.metrics, "rewards/format/gate_open"), 0.5);
    assert_eq!(metric(&s.metrics, "rewards/brevity/gate_open"), 0.25);
    // Raw values are what is logged per reward.
    assert!(close(metric(&s.metrics, "rewards/brevity/mean"), 0.6));
    // A NaN behind a closed gate still stops the step.
    let mut p = RewardPipeline::new(vec![fixed("correct", &[Some(0.0)], 1.0), fixed("format", &[Some(f64::NAN)], 0.5)])
        .unwrap();
    p.set_gates(&[None, Some(("correct", 1.0))]).unwrap();
    let e = p.score(&batch(&["a"], &cols)).unwrap_err().to_string();
    assert!(e.contains("`format`") && e.contains("NaN"), "{e}");
    // Unknown names and cycles are rejected.
    assert!(p.set_gates(&[None, Some(("nope", 1.0))]).is_err());
    assert!(p.set_gates(&[Some(("format", 1.0)), Some(("correct", 1.0))]).unwrap_err().to_string().contains("cycle"));
}

#[test]
fn one_bad_row_drops_its_sample_not_the_step() {
    // Regression (issue 13, finding 5): a row without its `answer` failed the whole step. Now sample 1 is dropped:
    // every reward None for it (so its total is NaN: no advantage), counted and noted; the others score as usual.
    let rule = safe::reward::RuleSource::new("correct", &Rule::ExactAnswer { field: "answer".into() }).unwrap();
    let p = RewardPipeline::new(vec![(Box::new(rule), 1.0), fixed("len", &[Some(0.5); 3], 1.0)]).unwrap();
    let good = json!({"answer": 2}).as_object().unwrap().clone();
    let bad = json!({"label": 2}).as_object().unwrap().clone();
    let mut inputs = batch(&["2", "2", "3"], &good);
    inputs[1].columns = &bad;
    let out = p.score(&inputs).unwrap();
    assert_eq!(out.per_reward[0].1, vec![Some(1.0), None, Some(0.0)]);
    assert_eq!(out.per_reward[1].1, vec![Some(0.5), None, Some(0.5)]);
    assert_eq!(out.total[0], 1.5);
    assert!(out.total[1].is_nan());
    assert_eq!(out.total[2], 0.5);
    assert_eq!(metric(&out.metrics, "rewards/dropped_samples"), 1.0);
    assert_eq!(out.notes.len(), 1);
    assert!(
        out.notes[0].contains("1 of 3 samples dropped") && out.notes[0].contains("no column `answer`"),
        "{:?}",
        out.notes
    );
}

#[test]
fn a_batch_with_no_reward_at_all_fails_instead_of_training_on_nan() {
    // Regression (issue 13, finding 7): a reward answering null for every sample trained silently with reward NaN.
    let p = RewardPipeline::new(vec![fixed("a", &[None, None], 1.0)]).unwrap();
    let cols = Map::new();
    let e = format!("{:#}", p.score(&batch(&["", ""], &cols)).unwrap_err());
    assert!(e.contains("no sample of the step has a reward") && e.contains("answered null"), "{e}");
    // One reward null throughout, another scoring: trained, with a note naming the silent one.
    let p =
        RewardPipeline::new(vec![fixed("a", &[None, None], 1.0), fixed("b", &[Some(1.0), Some(0.0)], 1.0)]).unwrap();
    let out = p.score(&batch(&["", ""], &cols)).unwrap();
    assert_eq!(out.notes, ["reward `a` answered null (not applicable) for every sample of the step"]);
}

#[test]
fn check_rows_names_where_each_bad_row_is_and_counts_them() {
    let rule = safe::reward::RuleSource::new("correct", &Rule::ExactAnswer { field: "answer".into() }).unwrap();
    let p = RewardPipeline::new(vec![(Box::new(rule), 1.0)]).unwrap();
    let good = json!({"answer": "7"}).as_object().unwrap().clone();
    let null = json!({"answer": null}).as_object().unwrap().clone();
    let bad = json!({"answer": "seven"}).as_object().unwrap().clone();
    p.check_rows([("d.jsonl:1".to_string(), &good), ("d.jsonl:2".to_string(), &null)]).unwrap();
    let rows: Vec<(String, &Map<String, Value>)> =
        (1..=8).map(|l| (format!("d.jsonl:{l}"), if l % 4 == 0 { &good } else { &bad })).collect();
    let e = format!("{:#}", p.check_rows(rows).unwrap_err());
    assert!(e.starts_with("6 data row(s) cannot feed the rewards"), "{e}");
    assert!(e.contains("d.jsonl:1: reward `correct`: column `answer` has no number in \"seven\""), "{e}");
    assert!(e.contains("... 1 more") && !e.contains("d.jsonl:4"), "{e}");
}
