//! Answers of remote reward sources (a command's line, a server's body): one JSON object with a `rewards` list and
//! optional named metrics, validated the same way for both.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// One reward per sample (None = not applicable) and named metrics of the batch.
pub type Answer = (Vec<Option<f64>>, Vec<(String, f64)>);

/// Parse `{"rewards": [number | null, ...], "<metrics_key>": {"<name>": [number, ...] | number}}` with exactly `n`
/// finite rewards; each metric is the mean of its list. Errors quote the start of the text.
pub fn parse_answer(text: &str, n: usize, metrics_key: &str) -> Result<Answer> {
    let short: String = text.chars().take(200).collect();
    let v: Value = serde_json::from_str(text).map_err(|e| {
        if ["NaN", "Infinity"].iter().any(|w| text.contains(w)) {
            anyhow!("the answer has a non-finite number (NaN or Infinity): {short:?}")
        } else {
            anyhow!("the answer is not valid JSON ({e}): {short:?}")
        }
    })?;
    let rewards =
        v.get("rewards").and_then(Value::as_array).with_context(|| format!("no \"rewards\" list in {short:?}"))?;
    if rewards.len() != n {
        bail!("returned {} rewards for a batch of {n}", rewards.len());
    }
    let rewards = rewards
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            Value::Null => Ok(None),
            r => r.as_f64().filter(|x| x.is_finite()).map(Some).with_context(|| format!("reward {i} is {r}")),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut metrics = Vec::new();
    if let Some(m) = v.get(metrics_key).and_then(Value::as_object) {
        for (name, value) in m {
            let xs: Vec<f64> = match value {
                Value::Array(a) => a.iter().filter_map(Value::as_f64).collect(),
                v => v.as_f64().into_iter().collect(),
            };
            if !xs.is_empty() {
                metrics.push((name.clone(), xs.iter().sum::<f64>() / xs.len() as f64));
            }
        }
    }
    Ok((rewards, metrics))
}
