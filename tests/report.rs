//! `safe runs`, `safe report` and `status.json` on real short runs: two quickstart runs that differ in `optim.lr`,
//! the exit-2 cases, and the report rendered in headless Chromium (the DOM and the screenshot's pixels).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::train::*;

/// Two 3-step quickstart runs with evaluations, `a` (lr 3e-3) and `b` (lr 1e-3), in one output directory,
/// trained once per test binary.
struct TwoRuns {
    _dir: tempfile::TempDir,
    out: PathBuf,
}

fn two_runs() -> &'static TwoRuns {
    static RUNS: OnceLock<TwoRuns> = OnceLock::new();
    RUNS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("runs");
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
        for (name, lr) in [("a", "3e-3"), ("b", "1e-3")] {
            let sets = [
                "run.max_steps=3".to_string(),
                "run.completions_every=1".to_string(),
                format!("run.output_dir={}", out.display()),
                format!("run.name={name}"),
                format!("optim.lr={lr}"),
                // Evaluations before step 1 (a line of its own), at step 2 and at the end.
                "run.log_every=1".to_string(),
                "eval.every=2".to_string(),
                "eval.max_prompts=8".to_string(),
                "eval.num_samples=2".to_string(),
                "eval.temperature=1.0".to_string(),
            ];
            ok(&train(&config, &sets.iter().map(String::as_str).collect::<Vec<_>>(), "never"));
        }
        TwoRuns { _dir: dir, out }
    })
}

fn safe(args: &[&str]) -> Output {
    safe_cmd().args(args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn finished_runs_record_done_in_status_json() {
    let runs = two_runs();
    let s = common::read_json(&runs.out.join("a/status.json"));
    assert_eq!(s["status"], "done");
    assert_eq!((s["step"].as_u64(), s["max_steps"].as_u64()), (Some(3), Some(3)));
    assert!(s["pid"].as_u64().is_some_and(|p| p > 0) && s["message"] == "");
    assert!(s["updated"].as_u64().unwrap() >= s["started"].as_u64().unwrap());
}

#[test]
fn runs_lists_both_runs_and_the_key_they_differ_in() {
    let runs = two_runs();
    let out = safe(&["runs", runs.out.to_str().unwrap()]);
    ok(&out);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("name") && lines[0].contains("status") && lines[0].ends_with("config"), "{text}");
    for (line, name, lr) in [(lines[1], "a", "0.003"), (lines[2], "b", "0.001")] {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[..3], [name, "done", "3/3"], "{text}");
        assert_eq!(fields.last().copied(), Some(format!("optim.lr={lr}").as_str()), "only optim.lr differs: {text}");
        assert_eq!(line.find("done"), lines[0].find("status"), "aligned: {text}");
    }

    let out = safe(&["runs", runs.out.to_str().unwrap(), "--format", "jsonl"]);
    ok(&out);
    let rows: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0]["name"].as_str(), rows[1]["name"].as_str()), (Some("a"), Some("b")));
    assert_eq!(rows[0]["config"], serde_json::json!({"optim.lr": 0.003}));
    assert_eq!(rows[1]["config"], serde_json::json!({"optim.lr": 0.001}));
    assert_eq!(
        (rows[0]["status"].as_str(), rows[0]["step"].as_u64(), rows[0]["max_steps"].as_u64()),
        (Some("done"), Some(3), Some(3))
    );
    for (row, name) in rows.iter().zip(["a", "b"]) {
        let text = std::fs::read_to_string(runs.out.join(name).join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let evals: Vec<f64> = lines.iter().filter_map(|l| l["eval/reward"].as_f64()).collect();
        assert_eq!(evals.len(), 3, "steps 0, 2 and 3: {text}");
        assert_eq!(row["eval_reward_final"].as_f64(), evals.last().copied());
        assert_eq!(row["eval_reward_best"].as_f64(), evals.iter().copied().reduce(f64::max));
        assert_eq!(row["reward"].as_f64(), lines.last().unwrap()["reward"].as_f64());
    }
}

#[test]
fn runs_reports_killed_and_unknown_runs() {
    let runs = two_runs();
    let dir = tempfile::tempdir().unwrap();
    // `k` says it is running but nobody holds its lock (the process was killed); `old` has no status.json.
    for name in ["k", "old"] {
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        std::fs::copy(runs.out.join("a/metrics.jsonl"), dir.path().join(name).join("metrics.jsonl")).unwrap();
    }
    let mut status = common::read_json(&runs.out.join("a/status.json"));
    status["status"] = "running".into();
    std::fs::write(dir.path().join("k/status.json"), status.to_string()).unwrap();
    std::fs::create_dir_all(dir.path().join("not-a-run")).unwrap();
    let out = safe(&["runs", dir.path().to_str().unwrap(), "--format", "jsonl"]);
    ok(&out);
    let rows: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(&str, &str, u64)> = rows
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["status"].as_str().unwrap(), r["step"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, [("k", "killed", 3), ("old", "unknown", 3)]);
}

#[test]
fn runs_and_report_exit_2_naming_the_directory() {
    let runs = two_runs();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let check = |out: Output, needle: &str| {
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(needle), "`{needle}` not in: {}", stderr(&out));
    };
    check(safe(&["runs", missing.to_str().unwrap()]), missing.to_str().unwrap());
    check(safe(&["runs", dir.path().to_str().unwrap()]), &format!("{} holds no runs", dir.path().display()));
    check(safe(&["report", missing.to_str().unwrap()]), &format!("{} does not exist", missing.display()));
    check(safe(&["report", dir.path().to_str().unwrap()]), &format!("{} has no metrics.jsonl", dir.path().display()));
    // The second directory is the bad one: named, and nothing is written.
    let a = runs.out.join("a");
    let html = dir.path().join("r.html");
    check(safe(&["report", a.to_str().unwrap(), missing.to_str().unwrap(), "-o", html.to_str().unwrap()]), "missing");
    assert!(!html.exists());
    check(
        safe(&["report", a.to_str().unwrap(), "--completions-steps", "2,9", "-o", html.to_str().unwrap()]),
        "no completions for step 9",
    );
    check(safe(&["report"]), "RUN_DIR");
}

#[test]
fn report_writes_beside_the_first_run_by_default() {
    let runs = two_runs();
    let dir = tempfile::tempdir().unwrap();
    // A copy, so the other tests' files are left alone.
    let run = dir.path().join("a");
    std::fs::create_dir_all(run.join("completions")).unwrap();
    for f in
        ["metrics.jsonl", "recipe.resolved.toml", "status.json", "completions/step-1.jsonl", "completions/step-3.jsonl"]
    {
        std::fs::copy(runs.out.join("a").join(f), run.join(f)).unwrap();
    }
    let out = safe(&["report", run.to_str().unwrap(), "--completions-steps", "3"]);
    ok(&out);
    assert_eq!(stdout(&out).trim(), run.join("report.html").display().to_string());
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("a · step 3") && !html.contains("a · step 1<"));
    // Nothing to run or fetch when opened.
    for needle in ["<script", " src=", "href=", "url(", "@import"] {
        assert!(!html.contains(needle), "{needle} in the report");
    }
}

// ---- The browser check ----

/// Chromium, if installed: `SAFE_CHROMIUM`, else `chromium` (Debian), `chromium-browser` or `google-chrome` on PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SAFE_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-browser", "google-chrome"].map(|n| d.join(n)))
        .find(|p| p.is_file())
}

/// Run headless Chromium on `page` with `args` (a fresh profile each time), at most 90 s.
fn headless(browser: &Path, page: &Path, args: &[String]) -> Output {
    let profile = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(90) {
            let _ = child.kill();
            panic!("{} did not finish in 90 s", browser.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A decoded RGBA screenshot.
struct Image {
    width: usize,
    height: usize,
    rgba: Vec<u8>,
}

impl Image {
    fn read(path: &Path) -> Self {
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        let channels = match info.color_type {
            png::ColorType::Rgba => 4,
            png::ColorType::Rgb => 3,
            other => panic!("unexpected PNG colour type {other:?}"),
        };
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let (width, height) = (info.width as usize, info.height as usize);
        let mut rgba = Vec::with_capacity(width * height * 4);
        for px in buf[..width * height * channels].chunks(channels) {
            rgba.extend_from_slice(&[px[0], px[1], px[2], if channels == 4 { px[3] } else { 255 }]);
        }
        Self { width, height, rgba }
    }

    /// Pixels within `tol` of `hex` (`#rrggbb`) per channel, in the rectangle [x0, x1) × [y0, y1).
    fn count(&self, hex: &str, tol: i32, (x0, y0, x1, y1): (usize, usize, usize, usize)) -> usize {
        let c: Vec<i32> = (0..3).map(|i| i32::from_str_radix(&hex[1 + 2 * i..3 + 2 * i], 16).unwrap()).collect();
        let mut n = 0;
        for y in y0..y1.min(self.height) {
            for x in x0..x1.min(self.width) {
                let p = &self.rgba[(y * self.width + x) * 4..][..3];
                if (0..3).all(|i| (p[i] as i32 - c[i]).abs() <= tol) {
                    n += 1;
                }
            }
        }
        n
    }

    /// Pixels darker than `level` in every channel (text, axes) in the rectangle.
    fn dark(&self, level: u8, (x0, y0, x1, y1): (usize, usize, usize, usize)) -> usize {
        (y0..y1.min(self.height))
            .flat_map(|y| (x0..x1.min(self.width)).map(move |x| (x, y)))
            .filter(|&(x, y)| self.rgba[(y * self.width + x) * 4..][..3].iter().all(|&v| v < level))
            .count()
    }
}

/// A run written by hand with what real runs rarely show at 3 steps: a step-0 line holding only evaluation
/// metrics, evaluations every 2 steps, a null reward (a gap), and a controller metric logged once (one point).
fn synthetic_run(dir: &Path) -> PathBuf {
    let run = dir.join("c-synthetic");
    std::fs::create_dir_all(&run).unwrap();
    let mut lines = vec![r#"{"step":0,"eval/reward":0.05,"eval/pass@4":0.1}"#.to_string()];
    for s in 1..=8u32 {
        let reward = if s == 5 { "null".to_string() } else { format!("{}", 0.1 * s as f64) };
        let mut l = format!(
            r#"{{"step":{s},"reward":{reward},"loss":{},"timing/rollout":0.5,"timing/update":0.25"#,
            1.0 / s as f64
        );
        if s % 2 == 0 {
            l.push_str(&format!(r#","eval/reward":{},"eval/pass@4":{}"#, 0.05 * s as f64, 0.1 * s as f64));
        }
        if s == 4 {
            l.push_str(r#","safe/threshold":0.2"#);
        }
        l.push('}');
        lines.push(l);
    }
    std::fs::write(run.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    run
}

/// `<svg ...>...</svg>` elements of a page, with their `data-metric`.
fn svgs(html: &str) -> Vec<(String, String)> {
    html.match_indices("<svg")
        .map(|(i, _)| {
            let end = i + html[i..].find("</svg>").expect("closed") + "</svg>".len();
            let el = &html[i..end];
            let metric = el.split("data-metric=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("").to_string();
            (metric, el.to_string())
        })
        .collect()
}

fn attr(el: &str, tag: &str, name: &str) -> f64 {
    let start = el.find(tag).unwrap_or_else(|| panic!("no {tag}"));
    let rest = &el[start..];
    let v = rest.split(&format!(" {name}=\"")).nth(1).and_then(|s| s.split('"').next()).unwrap();
    v.parse().unwrap()
}

#[test]
fn report_draws_in_headless_chromium() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("SAFE_REQUIRE_CHROMIUM").is_err(),
            "SAFE_REQUIRE_CHROMIUM is set but no Chromium was found (install chromium, or set SAFE_CHROMIUM)"
        );
        eprintln!("SKIPPED report_draws_in_headless_chromium: no chromium on PATH (scripts/test.sh installs it)");
        return;
    };
    let runs = two_runs();
    let dir = tempfile::tempdir().unwrap();
    let c = synthetic_run(dir.path());
    let (a, b) = (runs.out.join("a"), runs.out.join("b"));
    let page = dir.path().join("report.html");
    let out =
        safe(&["report", a.to_str().unwrap(), b.to_str().unwrap(), c.to_str().unwrap(), "-o", page.to_str().unwrap()]);
    ok(&out);
    let html = std::fs::read_to_string(&page).unwrap();
    let charts = svgs(&html);
    let metrics: Vec<&str> = charts.iter().map(|(m, _)| m.as_str()).collect();
    for m in [
        "reward",
        "rewards/correct/mean",
        "eval/reward",
        "eval/correct/mean",
        "eval/pass@2",
        "eval/pass@4",
        "loss",
        "learning_rate",
        "timing",
        "safe/threshold",
    ] {
        assert!(metrics.contains(&m), "no chart for {m}: {metrics:?}");
    }

    // The DOM as Chromium parsed it: every chart is an <svg> with drawn series.
    let dom = headless(&browser, &page, &["--dump-dom".into()]);
    assert!(dom.status.success(), "chromium --dump-dom failed: {}", stderr(&dom));
    let dom = stdout(&dom);
    let parsed = svgs(&dom);
    assert_eq!(parsed.len(), charts.len(), "every chart parsed as an <svg>");
    for (metric, el) in &parsed {
        let points = el.matches(" L").count() + el.matches("<circle").count();
        assert!(points >= 1, "chart {metric} draws nothing: {el}");
    }
    let reward = &parsed.iter().find(|(m, _)| m == "reward").unwrap().1;
    let paths: Vec<&str> = reward.split("<path").skip(1).collect();
    assert!(paths.len() >= 3, "a line each for a, b and c: {reward}");
    // c's reward: 7 values around a null: two sub-paths, 6 segments in all.
    let c_path = paths.iter().find(|p| p.contains(svg_color(2))).unwrap();
    assert_eq!((c_path.matches('M').count(), c_path.matches(" L").count()), (2, 5));
    assert!(paths.iter().filter(|p| p.matches(" L").count() >= 2).count() >= 2, "a and b: 3 steps each");
    let threshold = &parsed.iter().find(|(m, _)| m == "safe/threshold").unwrap().1;
    assert_eq!(threshold.matches("<circle").count(), 1, "a single point is drawn as a marker");

    // The screenshot of the whole page: each run's colour is drawn, and plenty of it.
    let shot = dir.path().join("page.png");
    let s = headless(&browser, &page, &[format!("--screenshot={}", shot.display()), "--window-size=1200,3000".into()]);
    assert!(s.status.success() && shot.is_file(), "chromium --screenshot failed: {}", stderr(&s));
    let img = Image::read(&shot);
    assert_eq!((img.width, img.height), (1200, 3000));
    let all = (0, 0, img.width, img.height);
    for i in 0..3 {
        let n = img.count(svg_color(i), 24, all);
        assert!(n > 500, "run {i}'s colour {} has {n} pixels on the page", svg_color(i));
    }

    // The reward chart alone: inside its plot area, each run's line; to the left of it, the tick labels.
    let alone = dir.path().join("reward.html");
    std::fs::write(&alone, format!("<!DOCTYPE html><html><body style=\"margin:0\">{reward}</body></html>")).unwrap();
    let (w, h) = (attr(reward, "<svg", "width"), attr(reward, "<svg", "height"));
    let shot = dir.path().join("reward.png");
    let s = headless(&browser, &alone, &[format!("--screenshot={}", shot.display()), format!("--window-size={w},{h}")]);
    assert!(s.status.success(), "chromium --screenshot failed: {}", stderr(&s));
    let img = Image::read(&shot);
    let (x, y) =
        (attr(reward, "<rect class=\"plot\"", "x") as usize, attr(reward, "<rect class=\"plot\"", "y") as usize);
    let (pw, ph) = (
        attr(reward, "<rect class=\"plot\"", "width") as usize,
        attr(reward, "<rect class=\"plot\"", "height") as usize,
    );
    let plot = (x + 2, y + 2, x + pw - 2, y + ph - 2);
    for i in 0..3 {
        let n = img.count(svg_color(i), 24, plot);
        assert!(n > 40, "run {i}'s colour {} has {n} pixels in the reward plot area", svg_color(i));
    }
    assert!(img.dark(120, (0, y, x, y + ph + 4)) > 30, "no tick labels left of the plot");
    assert!(img.dark(120, (x, y + ph, x + pw, y + ph + 40)) > 30, "no tick labels below the plot");
}

fn svg_color(i: usize) -> &'static str {
    safe::report::svg::PALETTE[i]
}
