//! `safe report` and `safe runs`: what runs did, read back from their run directories.
//!
//! `safe report RUN_DIR...` writes one self-contained HTML file: a table of the runs (status, steps, the recipe
//! keys they differ in), line charts over steps as inline SVG drawn here ([`svg`]: no script, no network when
//! viewed), several runs overlaid in one colour each, and sample completions. `safe runs OUTPUT_DIR` lists the runs
//! of an output directory ([`runs`]).

pub mod runs;
pub mod svg;

use std::path::{Path, PathBuf};

use crate::exit::{self, Failure};
use crate::metrics::names;
use crate::train::run_dir::{self, METRICS_FILE, RESOLVED_RECIPE_FILE};
use crate::train::status::{self, Observed};

/// G-RA: `rewards/<name>/gate_open`, the fraction of samples whose gate was open (src/reward/pipeline.rs).
const GATE_OPEN_SUFFIX: &str = "/gate_open";

/// Bad input for `report` or `runs` (exit 2): a missing directory, one without metrics, an unknown step.
#[derive(Debug, Clone, PartialEq)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

impl From<BadInput> for Failure {
    fn from(e: BadInput) -> Self {
        Failure::bad_input(e)
    }
}

/// `&`, `<`, `>`, `"` and `'` as entities: text and attribute values of HTML and SVG.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The lines of a `metrics.jsonl`: each a step and its metrics. A line that does not parse (the partial last line
/// of a run being written) or has no step is left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    lines: Vec<(u64, serde_json::Map<String, serde_json::Value>)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let lines = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(l).ok())
            .filter_map(|m| Some((m.get(names::STEP)?.as_f64()? as u64, m)))
            .collect();
        Self { lines }
    }

    /// Every metric name, in order of first appearance.
    pub fn keys(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for (_, m) in &self.lines {
            for k in m.keys() {
                if k != names::STEP && !out.contains(&k.as_str()) {
                    out.push(k);
                }
            }
        }
        out
    }

    /// `(step, value)` for every line that has `name`, by step (a later line for the same step wins); `None` for a
    /// logged null. Lines without `name` (a metric logged every N steps) are not points at all.
    pub fn series(&self, name: &str) -> Vec<(f64, Option<f64>)> {
        let mut out: Vec<(u64, Option<f64>)> = Vec::new();
        for (step, m) in &self.lines {
            if let Some(v) = m.get(name) {
                let v = v.as_f64().filter(|x| x.is_finite());
                match out.iter_mut().find(|(s, _)| s == step) {
                    Some(slot) => slot.1 = v,
                    None => out.push((*step, v)),
                }
            }
        }
        out.sort_by_key(|(s, _)| *s);
        out.into_iter().map(|(s, v)| (s as f64, v)).collect()
    }

    /// The finite values of `name`, by step.
    pub fn values(&self, name: &str) -> Vec<f64> {
        self.series(name).into_iter().filter_map(|(_, v)| v).collect()
    }

    pub fn last_step(&self) -> Option<u64> {
        self.lines.iter().map(|(s, _)| *s).max()
    }
}

/// A run directory, read.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: String,
    pub dir: PathBuf,
    pub metrics: Metrics,
    /// `recipe.resolved.toml`, flattened; `None` when missing or unreadable.
    pub recipe: Option<runs::Flat>,
    pub observed: Observed,
}

impl Run {
    /// Read a run directory; it must exist. A missing `metrics.jsonl` reads as no metrics.
    pub fn load(dir: &Path) -> Result<Self, BadInput> {
        if !dir.is_dir() {
            return Err(BadInput(format!("run directory {} does not exist", dir.display())));
        }
        let metrics = match std::fs::read_to_string(dir.join(METRICS_FILE)) {
            Ok(text) => Metrics::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Metrics::default(),
            Err(e) => return Err(BadInput(format!("cannot read {}: {e}", dir.join(METRICS_FILE).display()))),
        };
        let recipe = std::fs::read_to_string(dir.join(RESOLVED_RECIPE_FILE)).ok().and_then(|t| runs::flatten(&t).ok());
        let name = std::path::absolute(dir)
            .ok()
            .and_then(|d| Some(status::normalise(&d).file_name()?.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self { name, dir: dir.to_path_buf(), metrics, recipe, observed: status::observe(dir) })
    }
}

/// `--format` of `safe runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunsFormat {
    Table,
    Jsonl,
}

/// `safe runs`: the listing of the runs in `output_dir`.
pub fn list_runs(output_dir: &Path, format: RunsFormat) -> Result<String, Failure> {
    let found = runs::discover(output_dir)?;
    let rows = runs::rows(&found);
    Ok(match format {
        RunsFormat::Table => runs::table(&rows),
        RunsFormat::Jsonl => runs::jsonl(&rows),
    })
}

/// A chart to draw: its title and the metrics it shows (one line per run and metric).
#[derive(Debug, Clone, PartialEq)]
pub struct ChartSpec {
    pub section: &'static str,
    pub title: String,
    pub metrics: Vec<String>,
}

/// The sections of the report and the metrics each may hold, in order. A metric no run logged is left out; so is
/// a section left empty.
pub fn chart_specs(runs: &[Run]) -> Vec<ChartSpec> {
    let mut logged: Vec<&str> = Vec::new();
    for r in runs {
        for k in r.metrics.keys() {
            if !logged.contains(&k) {
                logged.push(k);
            }
        }
    }
    let has = |m: &str| logged.contains(&m);
    // Reward names, from the keys matching `names::reward_mean` (so a rename there carries over).
    let template = names::reward_mean("\u{0}");
    let (pre, post) = template.split_once('\u{0}').expect("reward_mean puts the name in");
    let reward_names: Vec<&str> = logged
        .iter()
        .filter_map(|k| k.strip_prefix(pre)?.strip_suffix(post))
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .collect();

    let mut specs = Vec::new();
    let mut one = |section: &'static str, m: &str| {
        if has(m) {
            specs.push(ChartSpec { section, title: m.to_string(), metrics: vec![m.to_string()] });
        }
    };
    one("Reward", names::REWARD);
    for n in &reward_names {
        one("Reward", &names::reward_mean(n));
    }
    one("Reward", names::REWARDS_RAW);
    one("Reward", names::REWARDS_SHAPED);

    // Evaluation: the mean score, each reward's mean, pass@k by k, lengths, then any other `eval/` metric.
    let eval_template = names::eval_reward_mean("\u{0}");
    let (eval_pre, eval_post) = eval_template.split_once('\u{0}').expect("eval_reward_mean puts the name in");
    let pass_at_zero = names::eval_pass_at(0);
    let pass_at_pre = pass_at_zero.strip_suffix('0').expect("eval_pass_at ends with k");
    let pass_k = |k: &str| k.strip_prefix(pass_at_pre).and_then(|n| n.parse::<u64>().ok());
    let mut eval: Vec<&str> = vec![names::EVAL_REWARD];
    eval.extend(logged.iter().copied().filter(|k| k.strip_prefix(eval_pre).is_some_and(|n| n.ends_with(eval_post))));
    let mut pass_at: Vec<&str> = logged.iter().copied().filter(|k| pass_k(k).is_some()).collect();
    pass_at.sort_by_key(|k| pass_k(k));
    eval.extend(pass_at);
    eval.extend([names::EVAL_MEAN_LENGTH, names::EVAL_CLIPPED_RATIO]);
    let rest: Vec<&str> = logged.iter().copied().filter(|k| k.starts_with(eval_pre) && !eval.contains(k)).collect();
    for m in eval.into_iter().chain(rest) {
        one("Evaluation", m);
    }

    for m in [names::KL, names::PPO_KL, names::ENTROPY, names::PPO_ENTROPY] {
        one("Policy", m);
    }
    for m in [names::COMPLETION_MEAN_LENGTH, names::COMPLETION_CLIPPED_RATIO] {
        one("Completions", m);
    }
    for m in [names::LOSS, names::GRAD_NORM, names::LEARNING_RATE] {
        one("Optimisation", m);
    }
    let timing: Vec<String> = [names::TIMING_ROLLOUT, names::TIMING_REWARD, names::TIMING_UPDATE, names::TIMING_EVAL]
        .into_iter()
        .filter(|m| has(m))
        .map(str::to_string)
        .collect();
    if !timing.is_empty() {
        specs.push(ChartSpec { section: "Timing", title: "timing (seconds)".into(), metrics: timing });
    }
    let mut one = |section: &'static str, m: &str| {
        if has(m) {
            specs.push(ChartSpec { section, title: m.to_string(), metrics: vec![m.to_string()] });
        }
    };
    for m in [
        names::PPO_KL_COEF,
        names::SAFE_THRESHOLD,
        names::SAFE_PHI,
        names::SAFE_PID,
        names::SAFE_ENTROPY_FACTOR,
        names::SAFE_ACTIVE,
        names::GRPO_LAMBDA_N_EFFICIENCY,
        names::GRPO_LAMBDA_FRAC_EFFICIENCY,
        names::GRPO_LAMBDA_RATIO_EFFICIENCY,
        names::GRPO_LAMBDA_RATIO_ACCURACY,
    ] {
        one("Controllers", m);
    }
    for n in &reward_names {
        one("Controllers", &format!("{pre}{n}{GATE_OPEN_SUFFIX}"));
    }
    specs
}

/// The chart of `spec` over `runs`: colour by run, dash pattern by metric.
pub fn chart(spec: &ChartSpec, runs: &[Run]) -> svg::Chart {
    let mut series = Vec::new();
    let mut legend = Vec::new();
    let several = spec.metrics.len() > 1;
    for (i, run) in runs.iter().enumerate() {
        let color = svg::PALETTE[i % svg::PALETTE.len()];
        let mut any = false;
        for (j, m) in spec.metrics.iter().enumerate() {
            let points = run.metrics.series(m);
            if points.is_empty() {
                continue;
            }
            any = true;
            let dash = svg::DASHES[j % svg::DASHES.len()];
            let label = if several { format!("{} · {m}", run.name) } else { run.name.clone() };
            series.push(svg::Series { label, color, dash, points });
        }
        if any && (runs.len() > 1 || !several) {
            legend.push(svg::LegendEntry { label: run.name.clone(), color, dash: "" });
        }
    }
    if several {
        let color = if runs.len() == 1 { svg::PALETTE[0] } else { "#555555" };
        for (j, m) in spec.metrics.iter().enumerate() {
            legend.push(svg::LegendEntry { label: m.clone(), color, dash: svg::DASHES[j % svg::DASHES.len()] });
        }
    }
    let id = if several { spec.title.split(' ').next().unwrap_or("").to_string() } else { spec.title.clone() };
    svg::Chart { title: spec.title.clone(), id, series, legend }
}

/// What `safe report` is asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportOptions {
    pub run_dirs: Vec<PathBuf>,
    /// Default: `<first run dir>/report.html`.
    pub output: Option<PathBuf>,
    /// Steps of the first run whose completions to show; empty: its first, middle and last completions file.
    pub completions_steps: Vec<u64>,
}

/// Completions shown per step.
const COMPLETION_ROWS: usize = 4;
/// Longer prompts and completions are cut to this many characters.
const TEXT_CHARS: usize = 400;

/// Steps that have a `completions/step-<N>.jsonl`, ascending.
pub fn completion_steps(run_dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(run_dir.join(run_dir::COMPLETIONS_DIR)) else { return Vec::new() };
    let mut steps: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let path = run_dir::completions_file(run_dir, 0);
            let zero = path.file_name()?.to_str()?;
            let (pre, post) = zero.split_once('0')?;
            name.strip_prefix(pre)?.strip_suffix(post)?.parse().ok()
        })
        .collect();
    steps.sort_unstable();
    steps
}

/// First, middle and last.
fn default_steps(available: &[u64]) -> Vec<u64> {
    let mut out: Vec<u64> = match available {
        [] => Vec::new(),
        a => vec![a[0], a[a.len() / 2], a[a.len() - 1]],
    };
    out.dedup();
    out
}

fn cut(s: &str) -> String {
    if s.chars().count() <= TEXT_CHARS {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(TEXT_CHARS).collect::<String>())
    }
}

fn completions_html(run: &Run, steps: &[u64]) -> Result<String, BadInput> {
    let mut out = String::new();
    for &step in steps {
        let path = run_dir::completions_file(&run.dir, step);
        let text =
            std::fs::read_to_string(&path).map_err(|e| BadInput(format!("cannot read {}: {e}", path.display())))?;
        out.push_str(&format!(
            "<h3>{} · step {step}</h3>\n<table class=\"completions\">\n<tr><th>prompt</th><th>completion</th><th>reward</th></tr>\n",
            escape(&run.name)
        ));
        for line in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).take(COMPLETION_ROWS)
        {
            let field = |k: &str| match &line[k] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => String::new(),
                v => v.to_string(),
            };
            let reward = line["reward"].as_f64().map_or("-".into(), |r| format!("{r:.4}"));
            out.push_str(&format!(
                "<tr><td><pre>{}</pre></td><td><pre>{}</pre></td><td class=\"num\">{reward}</td></tr>\n",
                escape(&cut(&field("prompt"))),
                escape(&cut(&field("completion")))
            ));
        }
        out.push_str("</table>\n");
    }
    Ok(out)
}

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 16px 20px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 12px; }
h2 { font-size: 16px; margin: 20px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 14px 0 6px; }
table { border-collapse: collapse; font-size: 13px; background: #fff; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; vertical-align: -1px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { background: #fff; border: 1px solid #e4e4e4; font-family: inherit; }
table.completions { width: 100%; max-width: 1140px; table-layout: fixed; }
table.completions th:nth-child(3) { width: 80px; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; font-size: 12px; }
";

/// The report as one HTML page.
pub fn render(runs: &[Run], completions_steps: &[u64]) -> Result<String, BadInput> {
    let rows = runs::rows(runs);
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    h.push_str(&format!("<title>safe report: {}</title>\n", escape(&names.join(", "))));
    h.push_str(&format!("<style>{STYLE}</style>\n</head>\n<body>\n"));
    h.push_str(&format!("<h1>safe report: {}</h1>\n", escape(&names.join(", "))));
    h.push_str("<table class=\"runs\">\n<tr>");
    for c in runs::COLUMNS {
        h.push_str(&format!("<th>{}</th>", escape(c)));
    }
    h.push_str("</tr>\n");
    for (i, row) in rows.iter().enumerate() {
        let color = svg::PALETTE[i % svg::PALETTE.len()];
        let cells = row.cells();
        let title = if row.message.is_empty() { String::new() } else { format!(" title=\"{}\"", escape(&row.message)) };
        h.push_str(&format!(
            "<tr><td><span class=\"swatch\" style=\"background:{color}\"></span>{}</td><td{title}>{}</td>",
            escape(&cells[0]),
            escape(&cells[1])
        ));
        for c in &cells[2..6] {
            h.push_str(&format!("<td class=\"num\">{}</td>", escape(c)));
        }
        h.push_str(&format!("<td>{}</td></tr>\n", escape(&cells[6])));
    }
    h.push_str("</table>\n");

    let specs = chart_specs(runs);
    let mut section = "";
    for spec in &specs {
        if spec.section != section {
            if !section.is_empty() {
                h.push_str("</div>\n");
            }
            section = spec.section;
            h.push_str(&format!("<h2>{}</h2>\n<div class=\"charts\">\n", escape(section)));
        }
        h.push_str(&svg::render(&chart(spec, runs)));
        h.push('\n');
    }
    if !section.is_empty() {
        h.push_str("</div>\n");
    }

    if let Some(first) = runs.first() {
        let available = completion_steps(&first.dir);
        let steps = if completions_steps.is_empty() { default_steps(&available) } else { completions_steps.to_vec() };
        if let Some(missing) = steps.iter().find(|s| !available.contains(s)) {
            return Err(BadInput(format!(
                "--completions-steps: {} has no completions for step {missing} ({})",
                first.dir.display(),
                if available.is_empty() {
                    "it has none: see run.completions_every".to_string()
                } else {
                    format!("it has steps {}", available.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
                }
            )));
        }
        if !steps.is_empty() {
            h.push_str("<h2>Sample completions</h2>\n");
            h.push_str(&completions_html(first, &steps)?);
        }
    }
    h.push_str("</body>\n</html>\n");
    Ok(h)
}

/// `safe report`: read the runs, write the HTML file, return its path. A missing run directory, one without
/// `metrics.jsonl`, or a step without completions is exit 2; a file that cannot be written is exit 1.
pub fn write_report(opts: &ReportOptions) -> Result<PathBuf, Failure> {
    let mut runs = Vec::new();
    for dir in &opts.run_dirs {
        if !dir.join(METRICS_FILE).is_file() {
            let why = if dir.is_dir() { "has no metrics.jsonl" } else { "does not exist" };
            return Err(BadInput(format!("run directory {} {why}", dir.display())).into());
        }
        runs.push(Run::load(dir)?);
    }
    // Two runs of the same name from different output directories: name them by output directory too.
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for r in runs.iter_mut() {
        if names.iter().filter(|n| **n == r.name).count() > 1 {
            if let Some(parent) =
                std::path::absolute(&r.dir).ok().and_then(|d| Some(d.parent()?.file_name()?.to_owned()))
            {
                r.name = format!("{}/{}", parent.to_string_lossy(), r.name);
            }
        }
    }
    let html = render(&runs, &opts.completions_steps)?;
    let out = opts.output.clone().unwrap_or_else(|| opts.run_dirs[0].join("report.html"));
    std::fs::write(&out, html)
        .map_err(|e| Failure::new(exit::TRAINING_FAILED, anyhow::anyhow!("cannot write {}: {e}", out.display())))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, metrics: &str) -> Run {
        Run {
            name: name.into(),
            dir: PathBuf::from(name),
            metrics: Metrics::parse(metrics),
            recipe: None,
            observed: Observed { state: status::RunState::Unknown, status: None },
        }
    }

    const SPARSE: &str = r#"{"step":0,"eval/reward":0.1,"eval/pass@4":0.2}
{"step":1,"reward":0.5,"rewards/correct/mean":0.5,"kl":null,"timing/rollout":1.0,"timing/update":2.0}
{"step":2,"reward":null,"rewards/correct/mean":0.25,"kl":0.01,"eval/mean_length":3,"eval/reward":0.3,"eval/pass@4":0.5,"eval/pass@1":0.1,"eval/correct/mean":0.3}
{"step":3,"reward":0.75,"rewards/correct/mean":0.75,"rewards/correct/gate_open":1.0,"safe/threshold":0.2}
{"step":4,"rew"#;

    #[test]
    fn metrics_read_sparse_lines_nulls_and_skip_a_partial_line() {
        let m = Metrics::parse(SPARSE);
        assert_eq!(m.last_step(), Some(3));
        assert_eq!(m.series("reward"), [(1.0, Some(0.5)), (2.0, None), (3.0, Some(0.75))]);
        assert_eq!(m.series("eval/reward"), [(0.0, Some(0.1)), (2.0, Some(0.3))]);
        assert_eq!(m.values("kl"), [0.01]);
        assert_eq!(m.series("safe/threshold"), [(3.0, Some(0.2))]);
        assert!(m.series("loss").is_empty());
        // A later line for the same step wins.
        let twice = Metrics::parse("{\"step\":1,\"eval/reward\":0.1}\n{\"step\":1,\"eval/reward\":0.2}\n");
        assert_eq!(twice.series("eval/reward"), [(1.0, Some(0.2))]);
    }

    #[test]
    fn charts_only_for_logged_metrics_in_section_order() {
        let specs = chart_specs(&[run("a", SPARSE), run("b", "{\"step\":1,\"loss\":1.0}\n")]);
        let titles: Vec<&str> = specs.iter().map(|s| s.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "reward",
                "rewards/correct/mean",
                "eval/reward",
                "eval/correct/mean",
                "eval/pass@1",
                "eval/pass@4",
                "eval/mean_length",
                "kl",
                "loss",
                "timing (seconds)",
                "safe/threshold",
                "rewards/correct/gate_open"
            ]
        );
        let timing = specs.iter().find(|s| s.section == "Timing").unwrap();
        assert_eq!(timing.metrics, ["timing/rollout", "timing/update"]);
    }

    #[test]
    fn runs_get_a_colour_each_and_the_legend_names_them() {
        let runs = [run("a", SPARSE), run("b", "{\"step\":1,\"reward\":0.2}\n{\"step\":2,\"reward\":0.3}\n")];
        let spec = ChartSpec { section: "Reward", title: "reward".into(), metrics: vec!["reward".into()] };
        let c = chart(&spec, &runs);
        assert_eq!(c.series.iter().map(|s| s.color).collect::<Vec<_>>(), [svg::PALETTE[0], svg::PALETTE[1]]);
        assert_eq!(c.legend.iter().map(|l| l.label.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        // A metric only one run logged: the other is left out of the legend.
        let spec =
            ChartSpec { section: "Evaluation", title: "eval/reward".into(), metrics: vec![names::EVAL_REWARD.into()] };
        assert_eq!(chart(&spec, &runs).legend.len(), 1);
        let timing = chart_specs(&runs).into_iter().find(|s| s.section == "Timing").unwrap();
        let c = chart(&timing, &runs);
        assert_eq!(c.series.len(), 2);
        assert_eq!(
            c.legend.iter().map(|l| l.label.as_str()).collect::<Vec<_>>(),
            ["a", "timing/rollout", "timing/update"]
        );
    }

    #[test]
    fn the_page_escapes_text_and_shows_completions() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("r<1>");
        std::fs::create_dir_all(run_dir.join("completions")).unwrap();
        std::fs::write(run_dir.join("metrics.jsonl"), SPARSE).unwrap();
        for step in [1, 2, 3, 10] {
            let line = serde_json::json!({"step": step, "prompt": "What is <b>1</b> + 1?", "completion": format!("2 & {step}"), "reward": 1.0});
            std::fs::write(run_dir.join(format!("completions/step-{step}.jsonl")), format!("{line}\n{line}\n"))
                .unwrap();
        }
        // Evaluation completions are not training completions.
        std::fs::write(run_dir.join("completions/eval-step-5.jsonl"), "{}\n").unwrap();
        assert_eq!(completion_steps(&run_dir), [1, 2, 3, 10]);
        let r = Run::load(&run_dir).unwrap();
        let one = std::slice::from_ref(&r);
        assert_eq!(r.name, "r<1>");
        let html = render(one, &[]).unwrap();
        assert!(html.contains("r&lt;1&gt;") && !html.contains("r<1>"));
        assert!(html.contains("What is &lt;b&gt;1&lt;/b&gt; + 1?") && html.contains("2 &amp; 10"));
        for step in ["step 1<", "step 3<", "step 10<"] {
            assert!(html.contains(step), "{step}");
        }
        assert!(!html.contains("step 2<"));
        assert!(!html.contains("<script"));
        assert_eq!(html.matches("<svg").count(), chart_specs(one).len());
        let picked = render(one, &[2]).unwrap();
        assert!(picked.contains("step 2<") && !picked.contains("step 10<"));
        let err = render(one, &[7]).unwrap_err();
        assert!(err.0.contains("no completions for step 7") && err.0.contains("1,2,3,10"), "{err}");
    }

    #[test]
    fn report_refuses_missing_dirs_and_dirs_without_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let opts =
            |d: &Path| ReportOptions { run_dirs: vec![d.to_path_buf()], output: None, completions_steps: vec![] };
        let e = write_report(&opts(&missing)).unwrap_err();
        assert_eq!(e.code, exit::BAD_INPUT);
        assert!(e.message().contains("nope") && e.message().contains("does not exist"));
        let e = write_report(&opts(dir.path())).unwrap_err();
        assert_eq!(e.code, exit::BAD_INPUT);
        assert!(e.message().contains("has no metrics.jsonl"));
        std::fs::write(dir.path().join("metrics.jsonl"), SPARSE).unwrap();
        let out = write_report(&opts(dir.path())).unwrap();
        assert_eq!(out, dir.path().join("report.html"));
        assert!(std::fs::read_to_string(out).unwrap().contains("<svg"));
    }
}
