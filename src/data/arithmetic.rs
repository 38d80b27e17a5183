//! `builtin:arithmetic`: short arithmetic questions with an `answer` column, generated from a fixed seed so every
//! machine and every run sees the same 1000 problems.
//!
//! Designed so that the quickstart's tiny, randomly initialised byte-level model (`builtin:tiny`, 259 tokens) sees
//! its reward rise within ~100 GRPO steps. A random policy emits a digit with probability ~10/259 per token, so a
//! reward on the last number only fires when answers are mostly one digit: then a 16-token completion is right a few
//! percent of the time, which gives every step of 8×8 completions some non-zero-variance groups to learn from.
//! The problems come in three tiers, interleaved so that every prefix of the data has the same mix:
//! - 40% identities (`a + 0`, `0 + a`, `a - 0`, `a × 1`, `1 × a`, a ≤ 9): the answer is a digit of the prompt, so
//!   "copy the digit" is a policy a two-layer model can find; the first visible gains come from these.
//! - 40% other one-digit answers (sums ≤ 9, differences of digits, products ≤ 9).
//! - 20% harder problems (operands up to 20, products up to 12 × 12) so that a real model (SmolLM2) still has
//!   room to improve on the same data.
//!
//! Answers are never negative (a − b has a ≥ b), so "the last number" needs no sign handling.

use serde_json::{Map, Value};

use super::{Dataset, Example, Prompt};
use crate::rollout::rng::{RowKey, RowRng};

/// Number of problems.
pub const SIZE: usize = 1000;
/// Fixed: the data is part of the task definition, not of a run, so `run.seed` does not change it.
const SEED: u64 = 0xa417_4e71;

/// The `builtin:arithmetic` dataset: prompts "What is a + b?" (or −, ×) with `answer` = the integer as a string.
pub fn dataset() -> Dataset {
    let mut rng = RowRng::new(RowKey { seed: SEED, step: 0, prompt: 0, sample: 0 });
    let mut below = |n: u64| (((rng.next_u64() as u128) * (n as u128)) >> 64) as u64;
    let examples = (0..SIZE)
        .map(|i| {
            let (a, op, b) = match i % 5 {
                0 | 1 => {
                    let a = below(10);
                    match below(5) {
                        0 => (a, '+', 0),
                        1 => (0, '+', a),
                        2 => (a, '-', 0),
                        3 => (a, '×', 1),
                        _ => (1, '×', a),
                    }
                }
                2 | 3 => match below(3) {
                    0 => {
                        let a = below(10);
                        (a, '+', below(10 - a))
                    }
                    1 => {
                        let a = below(10);
                        (a, '-', below(a + 1))
                    }
                    _ => {
                        let a = 1 + below(9);
                        (a, '×', below(9 / a + 1))
                    }
                },
                _ => match below(3) {
                    0 => (below(21), '+', below(21)),
                    1 => {
                        let a = below(21);
                        (a, '-', below(a + 1))
                    }
                    _ => (below(13), '×', below(13)),
                },
            };
            let answer = match op {
                '+' => a + b,
                '-' => a - b,
                _ => a * b,
            };
            let mut columns = Map::new();
            columns.insert("answer".into(), Value::String(answer.to_string()));
            Example { index: i, prompt: Prompt::Text(format!("What is {a} {op} {b}?")), columns }
        })
        .collect();
    Dataset::from_examples(examples).expect("SIZE > 0")
}
