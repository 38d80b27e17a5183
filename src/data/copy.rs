//! `builtin:copy`: the quickstart's task, designed so that the built-in tiny model (`builtin:tiny`, a 2-layer
//! byte-level Llama from a seed) learns it by RL from its random start within a minute on 2 cores.
//!
//! Each prompt is two random lowercase letters, a digit and `=` (`"qx7="`); the `answer` column is the digit.
//! A random policy emits the right digit first with probability ~1/259 per token, so with 3 new tokens about 1%
//! of completions score under `exact_answer` (the last number equals the answer): enough for every few GRPO steps
//! to have a group with differing rewards. The digit always sits two tokens before the end, so "copy the token
//! two back" is a circuit two layers can form; the letters make 6760 distinct prompts, so rows held out with
//! `eval.split` are prompts training never saw, and a high evaluation score means the model copies, not that it
//! memorised answers.

use serde_json::{Map, Value};

use super::{Dataset, Example, Prompt};
use crate::rollout::{RowKey, RowRng};

/// Number of rows.
pub const SIZE: usize = 1000;
/// Fixed: the data is part of the task, not of a run.
const SEED: u64 = 0xc0b1_0000_0000_0007;

/// The `builtin:copy` dataset: prompts `"<letter><letter><digit>="` with `answer` = the digit.
pub fn dataset() -> Dataset {
    let mut rng = RowRng::new(RowKey { seed: SEED, step: 0, prompt: 0, sample: 0 });
    let mut below = |n: u64| (((rng.next_u64() as u128) * (n as u128)) >> 64) as u64;
    let examples = (0..SIZE)
        .map(|i| {
            let letter = |x: u64| char::from(b'a' + x as u8);
            let (a, b, digit) = (letter(below(26)), letter(below(26)), below(10));
            let mut columns = Map::new();
            columns.insert("answer".into(), Value::String(digit.to_string()));
            Example { index: i, prompt: Prompt::Text(format!("{a}{b}{digit}=")), columns }
        })
        .collect();
    Dataset::from_examples(examples).expect("SIZE > 0")
}

#[cfg(test)]
mod tests {
    #[test]
    fn rows_are_two_letters_a_digit_and_equals_with_the_digit_as_answer() {
        let d = super::dataset();
        assert_eq!(d.len(), super::SIZE);
        let mut digits = [0usize; 10];
        for e in d.examples() {
            let crate::data::Prompt::Text(p) = &e.prompt else { panic!("text prompts") };
            let b = p.as_bytes();
            assert!(b.len() == 4 && b[0].is_ascii_lowercase() && b[1].is_ascii_lowercase() && b[3] == b'=', "{p}");
            assert_eq!(e.columns["answer"], serde_json::Value::String((b[2] as char).to_string()));
            digits[(b[2] - b'0') as usize] += 1;
        }
        // Every digit is common (a fair draw: 100 ± a few tens each).
        assert!(digits.iter().all(|&n| (60..140).contains(&n)), "{digits:?}");
        assert_eq!(super::dataset().examples(), d.examples(), "the same rows every time");
    }
}
