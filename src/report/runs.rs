//! `safe runs`: one row per run directory of an output directory: its status, how far it got, the recipe keys in
//! which the runs differ, and its final and best evaluation reward.

use std::path::{Path, PathBuf};

use super::{BadInput, Run};
use crate::metrics::names;

/// One recipe value, flattened: its TOML text (compared) and its JSON form (for `--format jsonl`).
#[derive(Debug, Clone, PartialEq)]
pub struct Leaf {
    pub toml: String,
    pub json: serde_json::Value,
}

impl Leaf {
    /// For people: strings unquoted, everything else as TOML writes it.
    pub fn display(&self) -> String {
        match &self.json {
            serde_json::Value::String(s) if self.toml.starts_with(['"', '\'']) => s.clone(),
            _ => self.toml.clone(),
        }
    }
}

/// A recipe flattened to dotted keys, in file order: `optim.lr`, `reward.0.weight`, `reward.1.gate.on`.
pub type Flat = Vec<(String, Leaf)>;

/// Flatten TOML text (a `recipe.resolved.toml`).
pub fn flatten(text: &str) -> Result<Flat, toml_edit::TomlError> {
    let doc: toml_edit::DocumentMut = text.parse()?;
    let mut out = Vec::new();
    flatten_table(doc.as_table(), "", &mut out);
    Ok(out)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn flatten_table(t: &toml_edit::Table, prefix: &str, out: &mut Flat) {
    for (k, item) in t.iter() {
        flatten_item(item, &join(prefix, k), out);
    }
}

fn flatten_item(item: &toml_edit::Item, path: &str, out: &mut Flat) {
    use toml_edit::Item;
    match item {
        Item::None => {}
        Item::Table(t) => flatten_table(t, path, out),
        Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                flatten_table(t, &join(path, &i.to_string()), out);
            }
        }
        Item::Value(toml_edit::Value::InlineTable(t)) => {
            for (k, v) in t.iter() {
                flatten_item(&Item::Value(v.clone()), &join(path, k), out);
            }
        }
        Item::Value(v) => out.push((path.to_string(), leaf(v))),
    }
}

fn leaf(v: &toml_edit::Value) -> Leaf {
    use toml_edit::Value as V;
    let toml = v.clone().decorated("", "").to_string();
    let json = match v {
        V::String(s) => serde_json::Value::from(s.value().as_str()),
        V::Integer(i) => serde_json::Value::from(*i.value()),
        V::Float(f) => serde_json::Number::from_f64(*f.value()).map_or_else(|| toml.clone().into(), Into::into),
        V::Boolean(b) => serde_json::Value::from(*b.value()),
        _ => serde_json::Value::from(toml.as_str()),
    };
    Leaf { toml, json }
}

/// Keys never compared: the run's name is already the row's name.
const NOT_COMPARED: &[&str] = &["run.name"];

/// The keys whose values are not the same in every recipe (a key missing from some recipe differs), in the order
/// they first appear. Runs without a recipe (`None`) take no part.
pub fn differing_keys(recipes: &[Option<&Flat>]) -> Vec<String> {
    let present: Vec<&Flat> = recipes.iter().flatten().copied().collect();
    let mut keys: Vec<&str> = Vec::new();
    for flat in &present {
        for (k, _) in flat.iter() {
            if !keys.contains(&k.as_str()) && !NOT_COMPARED.contains(&k.as_str()) {
                keys.push(k);
            }
        }
    }
    let value = |flat: &Flat, key: &str| flat.iter().find(|(k, _)| k == key).map(|(_, v)| v.toml.clone());
    keys.into_iter()
        .filter(|key| {
            let first = value(present[0], key);
            present.iter().any(|f| value(f, key) != first)
        })
        .map(str::to_string)
        .collect()
}

/// A row of `safe runs` (and the runs table of `safe report`).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub dir: PathBuf,
    pub status: String,
    /// Status message (the error of a failed or interrupted run).
    pub message: String,
    /// The last logged step (else the status's step).
    pub step: Option<u64>,
    pub max_steps: Option<u64>,
    /// The differing keys and this run's values (`None`: the key is not in this run's recipe).
    pub config: Vec<(String, Option<Leaf>)>,
    /// The last logged training reward.
    pub reward: Option<f64>,
    pub eval_reward_final: Option<f64>,
    pub eval_reward_best: Option<f64>,
}

/// Rows for `runs`, comparing their recipes with each other.
pub fn rows(runs: &[Run]) -> Vec<Row> {
    let keys = differing_keys(&runs.iter().map(|r| r.recipe.as_ref()).collect::<Vec<_>>());
    runs.iter()
        .map(|run| {
            let status = run.observed.status.as_ref();
            let eval: Vec<f64> = run.metrics.values(names::EVAL_REWARD);
            let max_steps = run
                .recipe
                .as_ref()
                .and_then(|f| f.iter().find(|(k, _)| k == "run.max_steps"))
                .and_then(|(_, v)| v.json.as_u64())
                .or(status.map(|s| s.max_steps));
            Row {
                name: run.name.clone(),
                dir: run.dir.clone(),
                status: run.observed.state.to_string(),
                message: status.map(|s| s.message.clone()).unwrap_or_default(),
                step: run.metrics.last_step().or(status.map(|s| s.step)),
                max_steps,
                config: keys
                    .iter()
                    .map(|k| {
                        let v = run.recipe.as_ref().and_then(|f| f.iter().find(|(fk, _)| fk == k)).map(|(_, v)| v);
                        (k.clone(), v.cloned())
                    })
                    .collect(),
                reward: run.metrics.values(names::REWARD).last().copied(),
                eval_reward_final: eval.last().copied(),
                eval_reward_best: eval.iter().copied().reduce(f64::max),
            }
        })
        .collect()
}

fn number(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.4}"))
}

impl Row {
    pub fn steps(&self) -> String {
        match (self.step, self.max_steps) {
            (Some(s), Some(m)) => format!("{s}/{m}"),
            (Some(s), None) => s.to_string(),
            (None, Some(m)) => format!("-/{m}"),
            (None, None) => "-".into(),
        }
    }

    /// `optim.lr=0.001 reward.0.weight=2`.
    pub fn config_text(&self) -> String {
        let parts: Vec<String> =
            self.config.iter().map(|(k, v)| format!("{k}={}", v.as_ref().map_or("-".into(), Leaf::display))).collect();
        parts.join(" ")
    }

    /// The row's fields for the table, in column order.
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.status.clone(),
            self.steps(),
            number(self.reward),
            number(self.eval_reward_final),
            number(self.eval_reward_best),
            self.config_text(),
        ]
    }

    /// One JSON object with stable field names.
    pub fn to_json(&self) -> serde_json::Value {
        let config: serde_json::Map<String, serde_json::Value> = self
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.as_ref().map_or(serde_json::Value::Null, |l| l.json.clone())))
            .collect();
        serde_json::json!({
            "name": self.name,
            "dir": self.dir.display().to_string(),
            "status": self.status,
            "message": self.message,
            "step": self.step,
            "max_steps": self.max_steps,
            "reward": self.reward,
            "eval_reward_final": self.eval_reward_final,
            "eval_reward_best": self.eval_reward_best,
            "config": config,
        })
    }
}

pub const COLUMNS: [&str; 7] = ["name", "status", "steps", "reward", "eval/reward", "best eval", "config"];

/// Aligned columns for people.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    let mut widths: Vec<usize> = COLUMNS.iter().map(|c| c.chars().count()).collect();
    for r in &cells {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |fields: Vec<&str>| {
        let n = fields.len();
        let mut s = String::new();
        for (i, (f, w)) in fields.into_iter().zip(&widths).enumerate() {
            s.push_str(f);
            if i + 1 < n {
                s.push_str(&" ".repeat(w - f.chars().count() + 2));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(COLUMNS.to_vec());
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// One JSON object per line, for scripts.
pub fn jsonl(rows: &[Row]) -> String {
    rows.iter().map(|r| format!("{}\n", r.to_json())).collect()
}

/// Whether `dir` is a run directory: it holds a resolved recipe or metrics.
pub fn is_run_dir(dir: &Path) -> bool {
    use crate::train::run_dir::{METRICS_FILE, RESOLVED_RECIPE_FILE};
    dir.join(RESOLVED_RECIPE_FILE).is_file() || dir.join(METRICS_FILE).is_file()
}

/// Every run directory directly inside `output_dir`, sorted by name. Exit 2 when the directory does not exist or
/// holds no run.
pub fn discover(output_dir: &Path) -> Result<Vec<Run>, BadInput> {
    let entries = std::fs::read_dir(output_dir)
        .map_err(|e| BadInput(format!("cannot read the output directory {}: {e}", output_dir.display())))?;
    let mut dirs: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir() && is_run_dir(p)).collect();
    if dirs.is_empty() {
        return Err(BadInput(format!(
            "{} holds no runs (no directory with a recipe.resolved.toml or metrics.jsonl)",
            output_dir.display()
        )));
    }
    dirs.sort();
    dirs.iter().map(|d| Run::load(d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = r#"
[run]
name = "a"
max_steps = 3

[optim]
lr = 0.003
schedule = "constant"

[[reward]]
name = "correct"
weight = 1.0
gate = { on = "format", min = 1.0 }

[[reward]]
name = "format"
weight = 0.5
"#;

    #[test]
    fn flattening_gives_dotted_keys_in_file_order() {
        let flat = flatten(A).unwrap();
        let keys: Vec<&str> = flat.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "run.name",
                "run.max_steps",
                "optim.lr",
                "optim.schedule",
                "reward.0.name",
                "reward.0.weight",
                "reward.0.gate.on",
                "reward.0.gate.min",
                "reward.1.name",
                "reward.1.weight"
            ]
        );
        let lr = &flat[2].1;
        assert_eq!(
            (lr.toml.as_str(), lr.json.clone(), lr.display()),
            ("0.003", serde_json::json!(0.003), "0.003".into())
        );
        let schedule = &flat[3].1;
        assert_eq!((schedule.toml.as_str(), schedule.display()), ("\"constant\"", "constant".to_string()));
    }

    #[test]
    fn differing_keys_ignore_the_name_and_count_missing_keys() {
        let a = flatten(A).unwrap();
        let b = flatten(&A.replace("name = \"a\"", "name = \"b\"").replace("lr = 0.003", "lr = 0.001")).unwrap();
        let c = flatten(&A.replace("weight = 0.5", "weight = 0.5\ntarget = 3")).unwrap();
        assert_eq!(differing_keys(&[Some(&a), Some(&a)]), Vec::<String>::new());
        assert_eq!(differing_keys(&[Some(&a), Some(&b)]), ["optim.lr"]);
        assert_eq!(differing_keys(&[Some(&a), None, Some(&b), Some(&c)]), ["optim.lr", "reward.1.target"]);
        let w = flatten(&A.replace("weight = 0.5", "weight = 2.0")).unwrap();
        assert_eq!(differing_keys(&[Some(&a), Some(&w)]), ["reward.1.weight"]);
        assert_eq!(differing_keys(&[Some(&a)]), Vec::<String>::new());
        assert_eq!(differing_keys(&[None, None]), Vec::<String>::new());
    }

    #[test]
    fn tables_align_columns_and_jsonl_has_stable_fields() {
        let row = |name: &str, lr: Option<f64>, eval: Option<f64>| Row {
            name: name.into(),
            dir: PathBuf::from(format!("runs/{name}")),
            status: "done".into(),
            message: String::new(),
            step: Some(3),
            max_steps: Some(300),
            config: vec![("optim.lr".into(), lr.map(|v| Leaf { toml: v.to_string(), json: v.into() }))],
            reward: Some(0.125),
            eval_reward_final: eval,
            eval_reward_best: eval,
        };
        let rows = [row("a", Some(0.003), None), row("longer-name", None, Some(0.5))];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |l: &str, word: &str| l.find(word).unwrap();
        assert_eq!(col(lines[0], "status"), col(lines[1], "done"));
        assert_eq!(col(lines[0], "status"), col(lines[2], "done"));
        assert_eq!(col(lines[0], "config"), col(lines[1], "optim.lr=0.003"));
        assert!(lines[2].ends_with("optim.lr=-") && lines[1].contains("3/300") && lines[1].contains("0.1250"));
        let j: Vec<serde_json::Value> = jsonl(&rows).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(j[0]["config"]["optim.lr"], 0.003);
        assert_eq!(j[1]["config"]["optim.lr"], serde_json::Value::Null);
        assert_eq!(
            (j[0]["eval_reward_best"].clone(), j[1]["eval_reward_final"].clone()),
            (serde_json::Value::Null, 0.5.into())
        );
        for key in [
            "name",
            "dir",
            "status",
            "message",
            "step",
            "max_steps",
            "reward",
            "eval_reward_final",
            "eval_reward_best",
            "config",
        ] {
            assert!(j[0].get(key).is_some(), "{key}");
        }
    }
}
