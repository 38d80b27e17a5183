//! Line charts as inline SVG: one chart per metric (or a few metrics, told apart by dash patterns), one colour per
//! run, with axes, tick labels and a legend. No script: the file draws the same in any browser, offline.

use std::fmt::Write;

use super::escape;

/// The colours runs get, in order (Tableau 10: distinct, and readable on white).
pub const PALETTE: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// Dash patterns for the metrics of a chart that shows several (the first is solid).
pub const DASHES: [&str; 4] = ["", "6 3", "2 3", "8 3 2 3"];

/// The size of a chart and of its plot area, in pixels.
pub const WIDTH: f64 = 560.0;
const PLOT_HEIGHT: f64 = 200.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 30.0;
/// Below the plot: tick labels and the axis name.
const AXIS_BELOW: f64 = 38.0;
const LEGEND_ROW: f64 = 18.0;
/// Up to this many points, each point also gets a marker (sparse series such as evaluations every N steps).
const MARKERS_UP_TO: usize = 30;

/// One line: `points` are (step, value), `None` for a logged null (drawn as a gap).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub dash: &'static str,
    pub points: Vec<(f64, Option<f64>)>,
}

/// An entry of a chart's legend: a short line in `color` with `dash`, then `label`.
#[derive(Debug, Clone, PartialEq)]
pub struct LegendEntry {
    pub label: String,
    pub color: &'static str,
    pub dash: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    /// Written as the `data-metric` attribute of the `<svg>`.
    pub id: String,
    pub series: Vec<Series>,
    pub legend: Vec<LegendEntry>,
}

/// An axis: its domain after rounding out to tick values, and the ticks.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub min: f64,
    pub max: f64,
    pub ticks: Vec<f64>,
    pub step: f64,
}

/// A "nice" tick spacing (1, 2 or 5 × 10^k) giving about `target` intervals over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

impl Axis {
    /// Ticks covering `[lo, hi]` (finite). An empty span is widened so a single value sits in the middle; with
    /// `integer`, tick spacing is at least 1 (steps).
    pub fn new(lo: f64, hi: f64, integer: bool) -> Self {
        let (mut lo, mut hi) = (lo, hi);
        if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()).max(1e-300) {
            let pad = if integer || lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            lo -= pad;
            hi += pad;
        }
        // Steps run from 1 (or 0) to N: six intervals end nearer N (1..120 → 0..120 by 20, not 0..150 by 50).
        let mut step = nice_step(hi - lo, if integer { 6.0 } else { 5.0 });
        if integer {
            step = step.max(1.0).round();
        }
        let min = (lo / step).floor() * step;
        let max = (hi / step).ceil() * step;
        let n = ((max - min) / step).round() as usize;
        let ticks = (0..=n).map(|i| min + i as f64 * step).collect();
        Self { min, max, ticks, step }
    }
}

/// A tick label: as few digits as the spacing needs; scientific notation for very small or large numbers.
pub fn tick_label(v: f64, step: f64) -> String {
    if v.abs() < step * 1e-9 {
        return "0".into();
    }
    let big = v.abs().max(step);
    if big >= 1e6 || step < 1e-4 {
        let s = format!("{v:.1e}");
        // 1.0e-6 → 1e-6
        return s.replace(".0e", "e");
    }
    let decimals = if step >= 1.0 { 0 } else { (-step.log10()).ceil().clamp(0.0, 6.0) as usize };
    format!("{v:.decimals$}")
}

fn approx_text_width(s: &str) -> f64 {
    s.chars().count() as f64 * 6.6
}

/// Lay the legend out in rows within the chart's width: (x, row) per entry, and the number of rows.
fn legend_layout(entries: &[LegendEntry]) -> (Vec<(f64, usize)>, usize) {
    let mut out = Vec::new();
    let (mut x, mut row) = (LEFT, 0usize);
    for e in entries {
        let w = 26.0 + approx_text_width(&e.label) + 14.0;
        if x + w > WIDTH - RIGHT && x > LEFT {
            x = LEFT;
            row += 1;
        }
        out.push((x, row));
        x += w;
    }
    let rows = if entries.is_empty() { 0 } else { row + 1 };
    (out, rows)
}

/// The chart's total height.
pub fn height(chart: &Chart) -> f64 {
    let (_, rows) = legend_layout(&chart.legend);
    TOP + PLOT_HEIGHT + AXIS_BELOW + rows as f64 * LEGEND_ROW + 6.0
}

/// The finite values' range over every series, x and y: `None` when there is none.
fn extent(series: &[Series]) -> Option<((f64, f64), (f64, f64))> {
    let mut it = series.iter().flat_map(|s| s.points.iter()).filter_map(|&(x, y)| match y {
        Some(y) if x.is_finite() && y.is_finite() => Some((x, y)),
        _ => None,
    });
    let (x0, y0) = it.next()?;
    Some(it.fold(((x0, x0), (y0, y0)), |((a, b), (c, d)), (x, y)| ((a.min(x), b.max(x)), (c.min(y), d.max(y)))))
}

/// Runs of consecutive finite points, split at nulls: each becomes one sub-path (a lone point becomes a marker).
pub fn segments(points: &[(f64, Option<f64>)]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for &(x, y) in points {
        match y {
            Some(y) if y.is_finite() && x.is_finite() => out.last_mut().expect("never empty").push((x, y)),
            _ => {
                if !out.last().expect("never empty").is_empty() {
                    out.push(Vec::new());
                }
            }
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// The chart as an `<svg>` element.
pub fn render(chart: &Chart) -> String {
    let h = height(chart);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" data-metric="{id}" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{h}" viewBox="0 0 {WIDTH} {h}" role="img" aria-label="{title}">"#,
        id = escape(&chart.id),
        title = escape(&chart.title),
    );
    let _ = write!(
        s,
        r#"<text class="title" x="{LEFT}" y="18" font-size="14" font-weight="600">{}</text>"#,
        escape(&chart.title)
    );
    let (pw, ph) = (WIDTH - LEFT - RIGHT, PLOT_HEIGHT);
    let _ = write!(
        s,
        r##"<rect class="plot" x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#ffffff" stroke="#cccccc"/>"##
    );
    let bottom = TOP + ph;
    match extent(&chart.series) {
        None => {
            let _ = write!(
                s,
                r##"<text x="{}" y="{}" font-size="12" fill="#666666" text-anchor="middle">no finite values</text>"##,
                LEFT + pw / 2.0,
                TOP + ph / 2.0
            );
        }
        Some(((x0, x1), (y0, y1))) => {
            let xa = Axis::new(x0, x1, true);
            let ya = Axis::new(y0, y1, false);
            let px = |x: f64| LEFT + (x - xa.min) / (xa.max - xa.min) * pw;
            let py = |y: f64| bottom - (y - ya.min) / (ya.max - ya.min) * ph;
            // Grid and tick labels.
            s.push_str(r##"<g class="axes" font-size="11" fill="#444444">"##);
            for &t in &ya.ticks {
                let y = py(t);
                let _ = write!(
                    s,
                    r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#eeeeee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                    LEFT + pw,
                    LEFT - 6.0,
                    y + 4.0,
                    tick_label(t, ya.step)
                );
            }
            for &t in &xa.ticks {
                let x = px(t);
                let _ = write!(
                    s,
                    r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{bottom}" stroke="#eeeeee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                    bottom + 15.0,
                    tick_label(t, xa.step)
                );
            }
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text></g>"#,
                LEFT + pw / 2.0,
                bottom + 31.0
            );
            // The lines, then markers for lone or sparse points.
            for series in &chart.series {
                let segs = segments(&series.points);
                let n: usize = segs.iter().map(Vec::len).sum();
                let title = format!("<title>{}</title>", escape(&series.label));
                let mut d = String::new();
                for seg in segs.iter().filter(|seg| seg.len() > 1) {
                    for (i, &(x, y)) in seg.iter().enumerate() {
                        let _ = write!(d, "{}{:.1},{:.1}", if i == 0 { "M" } else { " L" }, px(x), py(y));
                    }
                }
                if !d.is_empty() {
                    let dash = if series.dash.is_empty() {
                        String::new()
                    } else {
                        format!(r#" stroke-dasharray="{}""#, series.dash)
                    };
                    let _ = write!(
                        s,
                        r#"<path class="series" d="{d}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"{dash}>{title}</path>"#,
                        series.color
                    );
                }
                for seg in &segs {
                    if seg.len() == 1 || n <= MARKERS_UP_TO {
                        for &(x, y) in seg {
                            let _ = write!(
                                s,
                                r#"<circle class="point" cx="{:.1}" cy="{:.1}" r="3" fill="{}">{title}</circle>"#,
                                px(x),
                                py(y),
                                series.color
                            );
                        }
                    }
                }
            }
        }
    }
    // Legend.
    let (places, _) = legend_layout(&chart.legend);
    s.push_str(r#"<g class="legend" font-size="12">"#);
    for (e, (x, row)) in chart.legend.iter().zip(places) {
        let y = bottom + AXIS_BELOW + row as f64 * LEGEND_ROW + 8.0;
        let dash = if e.dash.is_empty() { String::new() } else { format!(r#" stroke-dasharray="{}""#, e.dash) };
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="{}" stroke-width="3"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            x + 20.0,
            e.color,
            x + 26.0,
            y + 4.0,
            escape(&e.label)
        );
    }
    s.push_str("</g></svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(points: Vec<(f64, Option<f64>)>) -> Chart {
        Chart {
            title: "reward".into(),
            id: "reward".into(),
            series: vec![Series { label: "a".into(), color: PALETTE[0], dash: "", points }],
            legend: vec![LegendEntry { label: "a".into(), color: PALETTE[0], dash: "" }],
        }
    }

    #[test]
    fn axes_round_out_to_nice_ticks() {
        let a = Axis::new(0.03, 0.161, false);
        assert_eq!((a.step, a.ticks.len()), (0.05, 5));
        assert!(a.min <= 0.03 && a.max >= 0.161 && a.min == 0.0);
        let x = Axis::new(1.0, 3.0, true);
        assert_eq!(x.ticks, [1.0, 2.0, 3.0]);
        // One value: widened around it.
        let one = Axis::new(5.0, 5.0, true);
        assert!(one.min < 5.0 && one.max > 5.0);
        let zero = Axis::new(0.0, 0.0, false);
        assert!(zero.min < 0.0 && zero.max > 0.0);
        let tiny = Axis::new(3e-3, 3e-3, false);
        assert!(tiny.min < 3e-3 && tiny.max > 3e-3 && tiny.ticks.len() >= 2);
    }

    #[test]
    fn tick_labels_use_the_digits_the_spacing_needs() {
        assert_eq!(tick_label(0.15, 0.05), "0.15");
        assert_eq!(tick_label(100.0, 50.0), "100");
        assert_eq!(tick_label(2e-6, 1e-6), "2e-6");
        assert_eq!(tick_label(1e-17, 0.1), "0");
        assert_eq!(tick_label(3.0e7, 1e7), "3e7");
    }

    #[test]
    fn nulls_split_lines_and_lone_points_get_markers() {
        let pts = vec![(1.0, Some(1.0)), (2.0, Some(2.0)), (3.0, None), (4.0, Some(1.5)), (5.0, None)];
        assert_eq!(segments(&pts), vec![vec![(1.0, 1.0), (2.0, 2.0)], vec![(4.0, 1.5)]]);
        let svg = render(&chart(pts));
        assert_eq!(svg.matches("<path").count(), 1);
        assert_eq!(svg.matches(" L").count(), 1, "one line segment: {svg}");
        assert_eq!(svg.matches("<circle").count(), 3, "sparse: every point marked");
        let single = render(&chart(vec![(7.0, Some(0.25))]));
        assert_eq!((single.matches("<path").count(), single.matches("<circle").count()), (0, 1));
        let empty = render(&chart(vec![(1.0, None)]));
        assert!(empty.contains("no finite values"));
    }

    #[test]
    fn dense_series_draw_no_markers_and_labels_are_escaped() {
        let pts: Vec<_> = (0..100).map(|i| (i as f64, Some((i as f64).sin()))).collect();
        let mut c = chart(pts);
        c.title = "a<b & c".into();
        let svg = render(&c);
        assert!(svg.contains("a&lt;b &amp; c") && !svg.contains("a<b"));
        assert_eq!(svg.matches("<circle").count(), 0);
        assert_eq!(svg.matches(" L").count(), 99);
    }

    #[test]
    fn long_legends_wrap_into_rows() {
        let mut c = chart(vec![(1.0, Some(1.0))]);
        let base = height(&c);
        c.legend = (0..12)
            .map(|i| LegendEntry { label: format!("run-with-a-long-name-{i}"), color: PALETTE[i % 10], dash: "" })
            .collect();
        assert!(height(&c) >= base + 3.0 * LEGEND_ROW);
    }
}
