//! Built-in rule rewards (`kind = "rule"`): cheap, deterministic functions of the completion text or length.

use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde_json::{Map, Value};

use super::{RewardInput, RewardSource};
use crate::recipe::Rule;

/// A rule from the recipe, ready to score (its regex compiled once).
#[derive(Debug)]
pub struct RuleSource {
    name: String,
    rule: Compiled,
    /// The last batch's samples whose data row could not be scored, with why.
    dropped: Mutex<Vec<(usize, String)>>,
}

#[derive(Debug, Clone)]
enum Compiled {
    ExactAnswer { field: String },
    Regex(Regex),
    Length { target: usize },
    Contains(String),
}

impl RuleSource {
    pub fn new(name: &str, rule: &Rule) -> Result<Self> {
        let rule = match rule {
            Rule::ExactAnswer { field } => Compiled::ExactAnswer { field: field.clone() },
            Rule::Regex { pattern } => Compiled::Regex(
                Regex::new(pattern).with_context(|| format!("reward `{name}`: invalid regex pattern {pattern:?}"))?,
            ),
            // The recipe checks target ≥ 1; checked again because the formula divides by it.
            Rule::Length { target: 0 } => bail!("reward `{name}`: length target must be at least 1"),
            Rule::Length { target } => Compiled::Length { target: *target },
            Rule::Contains { text } => Compiled::Contains(text.clone()),
        };
        Ok(RuleSource { name: name.to_string(), rule, dropped: Mutex::new(Vec::new()) })
    }

    fn score_one(&self, input: &RewardInput) -> Result<Option<f64>, String> {
        let hit = |b: bool| Some(if b { 1.0 } else { 0.0 });
        Ok(match &self.rule {
            Compiled::ExactAnswer { field } => exact_answer(field, input)?,
            Compiled::Regex(re) => hit(re.is_match(input.completion)),
            Compiled::Length { target } => Some(length_reward(input.completion_ids.len(), *target)),
            Compiled::Contains(text) => hit(input.completion.contains(text.as_str())),
        })
    }
}

impl RewardSource for RuleSource {
    fn name(&self) -> &str {
        &self.name
    }

    /// A sample whose data row cannot be scored (a column missing or mistyped) is `None` and reported by
    /// [`RewardSource::dropped`]: one bad row never fails the whole step.
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<Option<f64>>> {
        let mut dropped = Vec::new();
        let values = batch
            .iter()
            .enumerate()
            .map(|(i, input)| {
                self.score_one(input).unwrap_or_else(|why| {
                    dropped.push((i, why));
                    None
                })
            })
            .collect();
        *self.dropped.lock().unwrap() = dropped;
        Ok(values)
    }

    fn check_row(&self, columns: &Map<String, Value>) -> Result<(), String> {
        match &self.rule {
            Compiled::ExactAnswer { field } => answer_of(field, columns).map(|_| ()),
            Compiled::Regex(_) | Compiled::Length { .. } | Compiled::Contains(_) => Ok(()),
        }
    }

    fn dropped(&self) -> Vec<(usize, String)> {
        std::mem::take(&mut *self.dropped.lock().unwrap())
    }
}

/// `exact_answer`: 1.0 when the last number of the completion (see [`last_number`]) equals the answer column, else
/// 0.0 (also when the completion has no number).
///
/// The column may be a JSON number or a string; a string's answer is its last number too, so `"1,234"`, `" 42 "` and
/// GSM8K's `"... #### 72"` all work. A `null` answer means the row has no reference: `None` (not applicable). A missing
/// column, or one with no number in it, is a data error naming the column ([`answer_of`]).
///
/// Equality is numeric with a relative tolerance of 1e-9 (so `3.50` = `3.5`, and an answer stored as
/// `0.30000000000000004` still matches "0.3").
fn exact_answer(field: &str, input: &RewardInput) -> Result<Option<f64>, String> {
    let Some(answer) = answer_of(field, input.columns)? else { return Ok(None) };
    let correct = last_number(input.completion).is_some_and(|x| {
        let scale = 1f64.max(x.abs()).max(answer.abs());
        (x - answer).abs() <= 1e-9 * scale
    });
    Ok(Some(if correct { 1.0 } else { 0.0 }))
}

/// The reference answer of a data row for `exact_answer`: `None` for a `null` column; an error saying what is wrong
/// with the column otherwise (missing, not a number or string, no number in the string).
fn answer_of(field: &str, columns: &Map<String, Value>) -> Result<Option<f64>, String> {
    match columns.get(field) {
        None => Err(format!("no column `{field}` (exact_answer compares with it)")),
        Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| format!("column `{field}`: {n} is not a number")),
        Some(Value::String(s)) => {
            last_number(s).map(Some).ok_or_else(|| format!("column `{field}` has no number in {s:?}"))
        }
        Some(other) => Err(format!("column `{field}` must be a number or a string, got {other}")),
    }
}

/// `length`: max(0, 1 − |len − target| / target), with `len` the completion's token count (EOS included when it was
/// sampled). 1.0 at the target, falling linearly to 0 at 0 tokens and at 2 × target; never negative, so it cannot
/// outweigh a correctness reward by going far below zero.
fn length_reward(len: usize, target: usize) -> f64 {
    let (len, target) = (len as f64, target as f64);
    (1.0 - (len - target).abs() / target).max(0.0)
}

/// The last number written in `text`, as models write answers: an optional sign (`-` or `−`, only when not glued to
/// a preceding letter or digit, so "2024-01" and "x-3" give positive numbers), digits with optional thousands
/// separators (`1,234,567`: groups of exactly three after the first), and an optional decimal part (`3.50`). A period
/// not followed by a digit ends the number ("is 42." → 42). Comma-separated digits that are not thousands groups are
/// separate numbers ("1,2,3" → 3). Not recognised: a leading-dot decimal (".5" reads as 5), exponents ("1e5" reads as
/// 5), fractions ("1/2" reads as 2). `None` if there is no digit.
pub fn last_number(text: &str) -> Option<f64> {
    static NUMBER: OnceLock<Regex> = OnceLock::new();
    let re = NUMBER.get_or_init(|| Regex::new(r"([-−])?(\d+(?:,\d+)*)(\.\d+)?").expect("valid number regex"));
    let caps = re.captures_iter(text).last()?;
    let whole = caps.get(0)?;
    let int = caps.get(2)?.as_str();
    let frac = caps.get(3).map_or("", |m| m.as_str());
    let mut groups = int.split(',');
    let first = groups.next()?;
    let thousands = first.len() <= 3 && groups.clone().all(|g| g.len() == 3);
    let (digits, signed) = if thousands {
        (int.replace(',', ""), true)
    } else {
        // Not a thousands-separated number: the last comma-separated group stands alone (and has no sign).
        let last = int.rsplit(',').next()?;
        (last.to_string(), !int.contains(','))
    };
    let glued = text[..whole.start()].chars().next_back().is_some_and(|c| c.is_alphanumeric());
    let negative = signed && caps.get(1).is_some() && !glued;
    let value: f64 = format!("{digits}{frac}").parse().ok()?;
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::FinishReason;
    use serde_json::{json, Map};

    fn input<'a>(completion: &'a str, ids: &'a [u32], columns: &'a Map<String, Value>) -> RewardInput<'a> {
        RewardInput {
            prompt: "p",
            raw_prompt: None,
            completion,
            completion_ids: ids,
            finish: FinishReason::Eos,
            columns,
        }
    }

    fn columns(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn last_number_on_tricky_text() {
        // Each case: the last match of sign?digits(,digits)*(.digits)?, then the rules of `last_number`.
        let cases: &[(&str, Option<f64>)] = &[
            ("The answer is 42.", Some(42.0)), // trailing period is punctuation
            ("-3", Some(-3.0)),
            ("x = −7", Some(-7.0)),  // Unicode minus
            ("1,234", Some(1234.0)), // thousands separator
            ("total: 1,234,567.5 apples", Some(1234567.5)),
            ("no number", None),
            ("3.50 vs 3.5", Some(3.5)),           // last one wins
            ("first 12 then 7, done", Some(7.0)), // trailing comma is punctuation
            ("1,2,3", Some(3.0)),                 // a list, not thousands
            ("12,34", Some(34.0)),
            ("on 2024-01", Some(1.0)), // hyphen glued to a digit is not a sign
            ("step-3", Some(3.0)),
            ("so (-12)", Some(-12.0)),
            ("0.5", Some(0.5)),
        ];
        for (text, want) in cases {
            assert_eq!(last_number(text), *want, "{text:?}");
        }
    }

    #[test]
    fn exact_answer_scores() {
        let rule = RuleSource::new("correct", &Rule::ExactAnswer { field: "answer".into() }).unwrap();
        let num = columns(json!({"answer": 42}));
        let text = columns(json!({"answer": "1,234"}));
        let neg = columns(json!({"answer": "-3"}));
        let dec = columns(json!({"answer": 3.5}));
        let null = columns(json!({"answer": null}));
        let batch = [
            input("The answer is 42.", &[], &num), // 42 = 42 → 1
            input("-3", &[], &neg),                // -3 = "-3" → 1
            input("so 1234", &[], &text),          // 1234 = "1,234" → 1
            input("1,234", &[], &text),            // 1234 = 1234 → 1
            input("no number", &[], &num),         // no number → 0
            input("3.50 vs 3.5", &[], &dec),       // last is 3.5 = 3.5 → 1
            input("42 or maybe 41", &[], &num),    // last is 41 ≠ 42 → 0
            input("3", &[], &neg),                 // 3 ≠ -3 → 0
            input("42", &[], &null),               // no reference → None
        ];
        let got = rule.score(&batch).unwrap();
        let one = Some(1.0);
        let zero = Some(0.0);
        assert_eq!(got, vec![one, one, one, one, zero, one, zero, zero, None]);
    }

    #[test]
    fn exact_answer_data_errors_name_the_column_and_drop_only_their_sample() {
        let rule = RuleSource::new("correct", &Rule::ExactAnswer { field: "answer".into() }).unwrap();
        let good = columns(json!({"answer": 1}));
        let missing = columns(json!({"label": 1}));
        let wordy = columns(json!({"answer": "forty-two"}));
        let list = columns(json!({"answer": [1]}));
        for (cols, why) in [
            (&missing, "no column `answer` (exact_answer compares with it)"),
            (&wordy, "column `answer` has no number in \"forty-two\""),
            (&list, "column `answer` must be a number or a string, got [1]"),
        ] {
            assert_eq!(rule.check_row(cols).unwrap_err(), why);
            // At run time the bad row is dropped (None, reported), the good one scored.
            let got = rule.score(&[input("1", &[], &good), input("1", &[], cols)]).unwrap();
            assert_eq!(got, vec![Some(1.0), None]);
            assert_eq!(rule.dropped(), vec![(1, why.to_string())]);
            assert_eq!(rule.dropped(), vec![], "taken once");
        }
        assert_eq!(rule.check_row(&good), Ok(()));
        assert_eq!(rule.check_row(&columns(json!({"answer": null}))), Ok(()));
    }

    #[test]
    fn regex_contains_length() {
        let cols = Map::new();
        let re = RuleSource::new("fmt", &Rule::Regex { pattern: r"<answer>\d+</answer>".into() }).unwrap();
        let got = re.score(&[input("so <answer>4</answer> ok", &[], &cols), input("<answer></answer>", &[], &cols)]);
        assert_eq!(got.unwrap(), vec![Some(1.0), Some(0.0)]); // search, not full match
        let has = RuleSource::new("has", &Rule::Contains { text: "Answer:".into() }).unwrap();
        let got = has.score(&[input("Answer: 3", &[], &cols), input("answer: 3", &[], &cols)]);
        assert_eq!(got.unwrap(), vec![Some(1.0), Some(0.0)]); // case-sensitive
                                                              // target 4: len 4 → 1; len 2 or 6 → 1 − 2/4 = 0.5; len 8 → 0; len 12 → max(0, 1 − 8/4) = 0; len 0 → 0.
        let len = RuleSource::new("len", &Rule::Length { target: 4 }).unwrap();
        let ids = [0u32; 12];
        let got: Vec<_> = [4, 2, 6, 8, 12, 0].iter().map(|&n| input("", &ids[..n], &cols)).collect();
        let got = len.score(&got).unwrap();
        assert_eq!(got, vec![Some(1.0), Some(0.5), Some(0.5), Some(0.0), Some(0.0), Some(0.0)]);
        assert!(RuleSource::new("len", &Rule::Length { target: 0 }).is_err());
        assert!(RuleSource::new("bad", &Rule::Regex { pattern: "(".into() }).is_err());
    }
}
