//! The report's plots, as SVG written by hand (polylines, rectangles and
//! text: nothing a plotting library would add is needed), from the same
//! results as the tables: the agent's CPU and peak RSS against pods, the
//! scrape's p50/p99 against pods, and what each workload loses with the
//! agent attached.

use std::fmt::Write as _;

use super::results::{AbWorkload, BenchResults};

const W: f64 = 640.0;
const H: f64 = 360.0;
/// Plot area: left, top, right, bottom margins.
const L: f64 = 70.0;
const T: f64 = 40.0;
const R: f64 = 160.0;
const B: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// One line of a line chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A horizontal line across the plot, e.g. a target.
pub struct Rule {
    pub y: f64,
    pub label: String,
}

/// 1, 2 or 5 times a power of ten, at least `x`.
fn nice(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|v| *v >= x * (1.0 - 1e-9))
        .unwrap_or(10.0 * p)
}

/// A y axis from `lo` to `hi` in about five even steps: (min, max, step).
fn y_axis(lo: f64, hi: f64) -> (f64, f64, f64) {
    let lo = lo.min(0.0);
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let step = nice((hi - lo) / 5.0);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Tick labels without needless zeros.
fn tick(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// The frame, title, axis labels and y grid; returns the y mapping.
fn frame(out: &mut String, title: &str, x_label: &str, y_label: &str, y: (f64, f64, f64)) {
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        W / 2.0,
        esc(title),
        L + (W - L - R) / 2.0,
        H - 12.0,
        esc(x_label),
        T + (H - T - B) / 2.0,
        esc(y_label),
    );
    let (lo, hi, step) = y;
    let n = ((hi - lo) / step).round() as i64;
    for i in 0..=n {
        let v = lo + i as f64 * step;
        let py = map_y(v, y);
        let _ = writeln!(
            out,
            "<line x1=\"{L}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - R,
            L - 6.0,
            py + 4.0,
            tick(v)
        );
    }
    let _ = writeln!(
        out,
        "<rect x=\"{L}\" y=\"{T}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>",
        W - L - R,
        H - T - B
    );
}

fn map_y(v: f64, (lo, hi, _): (f64, f64, f64)) -> f64 {
    H - B - (v - lo) / (hi - lo) * (H - T - B)
}

fn rule(out: &mut String, r: &Rule, y: (f64, f64, f64)) {
    let py = map_y(r.y, y);
    let _ = writeln!(
        out,
        "<line x1=\"{L}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ff7f0e\" stroke-dasharray=\"6 4\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#ff7f0e\">{}</text>",
        W - R,
        W - R + 6.0,
        py + 4.0,
        esc(&r.label)
    );
}

fn legend(out: &mut String, names: &[&str]) {
    for (i, name) in names.iter().enumerate() {
        let y = T + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            out,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            W - R + 8.0,
            y,
            COLORS[i % COLORS.len()],
            W - R + 26.0,
            y + 10.0,
            esc(name)
        );
    }
}

/// A line chart over a log10 x axis (pods: 10, 100, 1000), ticks at the
/// points' x values.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    rules: &[Rule],
) -> String {
    // A series without figures (an older run's) has no line and no legend.
    let series: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|x| *x > 0.0)
        .collect();
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(rules.iter().map(|r| r.y));
    let (ylo, yhi) = ys.fold((0.0f64, 0.0f64), |(a, b), y| (a.min(y), b.max(y)));
    let y = y_axis(ylo, yhi);
    let (xlo, xhi) = xs.iter().fold((f64::INFINITY, 0.0f64), |(a, b), x| {
        (a.min(x.log10()), b.max(x.log10()))
    });
    let (xlo, xhi) = if xhi > xlo {
        (xlo, xhi)
    } else {
        (xlo - 1.0, xlo + 1.0)
    };
    let map_x = |x: f64| L + 20.0 + (x.log10() - xlo) / (xhi - xlo) * (W - L - R - 40.0);

    let mut out = String::new();
    frame(&mut out, title, x_label, y_label, y);
    let mut ticks = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for x in ticks {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            map_x(x),
            H - B + 16.0,
            tick(x)
        );
    }
    for r in rules {
        rule(&mut out, r, y);
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.0 > 0.0)
            .map(|&(x, v)| format!("{:.1},{:.1}", map_x(x), map_y(v, y)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
        for p in &pts {
            let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                out,
                "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3.5\" fill=\"{color}\"/>"
            );
        }
    }
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    legend(&mut out, &names);
    out.push_str("</svg>\n");
    out
}

/// Grouped bars: one group per category, one bar per series (a missing
/// figure leaves a gap), values printed above the bars.
pub fn bars(
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<Option<f64>>)],
    rules: &[Rule],
) -> String {
    let vals = series
        .iter()
        .flat_map(|s| s.1.iter().flatten().copied())
        .chain(rules.iter().map(|r| r.y));
    let (ylo, yhi) = vals.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let y = y_axis(ylo * 1.1, yhi * 1.1);
    let mut out = String::new();
    frame(&mut out, title, "", y_label, y);
    let group = (W - L - R) / categories.len().max(1) as f64;
    let bar = group * 0.7 / series.len().max(1) as f64;
    let zero = map_y(0.0, y);
    for (c, name) in categories.iter().enumerate() {
        let gx = L + c as f64 * group;
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            gx + group / 2.0,
            H - B + 16.0,
            esc(name)
        );
        for (i, (_, values)) in series.iter().enumerate() {
            let Some(v) = values.get(c).copied().flatten() else {
                continue;
            };
            let x = gx + group * 0.15 + i as f64 * bar;
            let top = map_y(v, y);
            let _ = writeln!(
                out,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{v:.1}</text>",
                top.min(zero),
                bar * 0.9,
                (top - zero).abs(),
                COLORS[i % COLORS.len()],
                x + bar * 0.45,
                top.min(zero) - 3.0,
            );
        }
    }
    let _ = writeln!(
        out,
        "<line x1=\"{L}\" y1=\"{zero:.1}\" x2=\"{:.1}\" y2=\"{zero:.1}\" stroke=\"#333\"/>",
        W - R
    );
    for r in rules {
        rule(&mut out, r, y);
    }
    let names: Vec<&str> = series.iter().map(|s| s.0.as_str()).collect();
    legend(&mut out, &names);
    out.push_str("</svg>\n");
    out
}

/// The report's plots: (file stem, title, SVG), those the run has figures
/// for.
pub fn plots(r: &BenchResults) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    let rows: Vec<(f64, &super::results::AtPods)> = r
        .scale()
        .map(|s| {
            s.by_pods
                .iter()
                .filter_map(|p| Some((p.meta.pods as f64, p.outcome.measured()?)))
                .collect()
        })
        .unwrap_or_default();
    if !rows.is_empty() {
        let series = |name: &str, f: &dyn Fn(&super::results::AtPods) -> Option<f64>| Series {
            name: name.into(),
            points: rows
                .iter()
                .filter_map(|(n, a)| Some((*n, f(a).filter(|v| v.is_finite())?)))
                .collect(),
        };
        let title = "Agent CPU against pods (15 s scrapes)";
        out.push((
            "scale-cpu",
            title.to_owned(),
            lines(
                title,
                "pods (log scale)",
                "% of one core",
                &[series("agent CPU", &|a| Some(a.cpu_pct_of_one_core))],
                &[Rule {
                    y: 0.5,
                    label: "target 0.5 %".into(),
                }],
            ),
        ));
        let title = "Agent peak RSS against pods";
        out.push((
            "scale-rss",
            title.to_owned(),
            lines(
                title,
                "pods (log scale)",
                "MiB",
                &[series("peak RSS", &|a| Some(a.peak_rss_mib))],
                &[Rule {
                    y: 40.0,
                    label: "target 40 MiB".into(),
                }],
            ),
        ));
        let title = "/metrics latency against pods";
        out.push((
            "scale-latency",
            title.to_owned(),
            lines(
                title,
                "pods (log scale)",
                "ms",
                &[
                    series("max gzip, 15 s apart", &|a| a.spaced.as_ref()?.max_ms),
                    series("p50 gzip, 15 s apart", &|a| a.spaced.as_ref()?.p50_ms),
                    series("p50 gzip", &|a| a.scrape.p50_ms),
                    series("p99 gzip", &|a| a.scrape.p99_ms),
                    series("p50 plain", &|a| a.plain.as_ref()?.scrape.p50_ms),
                    series("p99 plain", &|a| a.plain.as_ref()?.scrape.p99_ms),
                ],
                &[Rule {
                    y: 10.0,
                    label: "target 10 ms".into(),
                }],
            ),
        ));
    }
    if let Some(o) = r.overhead() {
        let title = "Throughput lost with podmeter attached (median of the rounds' own losses)";
        let names: Vec<String> = o.workloads.iter().map(|w| w.name.clone()).collect();
        let arm = |stats: bool| {
            o.workloads
                .iter()
                .map(|w| w.round_median_loss_pct(stats))
                .collect()
        };
        out.push((
            "overhead",
            title.to_owned(),
            bars(
                title,
                "% lost",
                &names,
                &[
                    (
                        "empty programs only (no agent)".into(),
                        o.workloads
                            .iter()
                            .map(AbWorkload::round_median_empty_programs_loss_pct)
                            .collect(),
                    ),
                    ("BPF statistics off".into(), arm(false)),
                    ("BPF statistics on".into(), arm(true)),
                ],
                &[Rule {
                    y: 3.0,
                    label: "target 3 %".into(),
                }],
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round() {
        assert_eq!(nice(0.7), 1.0);
        assert_eq!(nice(1.3), 2.0);
        assert_eq!(nice(3.0), 5.0);
        assert_eq!(nice(40.0), 50.0);
        assert_eq!(y_axis(0.0, 33.7), (0.0, 40.0, 10.0));
        assert_eq!(y_axis(-1.2, 6.2), (-2.0, 8.0, 2.0));
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(1000.0), "1000");
    }

    #[test]
    fn lines_place_points_by_log_x_and_linear_y() {
        let svg = lines(
            "t",
            "pods",
            "ms",
            &[Series {
                name: "p99 <gzip>".into(),
                points: vec![(10.0, 0.0), (100.0, 20.0), (1000.0, 40.0)],
            }],
            &[Rule {
                y: 10.0,
                label: "target".into(),
            }],
        );
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("p99 &lt;gzip&gt;"), "escaped legend");
        let line = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        let pts: Vec<(f64, f64)> = line
            .split("points=\"")
            .nth(1)
            .unwrap()
            .trim_end_matches("\"/>")
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        // Equal steps in log x; y 0 at the bottom, 40 (the axis top) at T.
        assert!((pts[1].0 - pts[0].0 - (pts[2].0 - pts[1].0)).abs() < 0.2);
        assert_eq!(pts[0].1, H - B);
        assert_eq!(pts[2].1, T);
        assert!((pts[1].1 - (H - B + T) / 2.0).abs() < 0.1);
        assert_eq!(svg.matches("<circle").count(), 3);
    }

    #[test]
    fn bars_leave_gaps_for_missing_figures_and_go_below_zero() {
        let svg = bars(
            "t",
            "%",
            &["switch".into(), "udp".into()],
            &[
                ("off".into(), vec![Some(4.0), Some(-1.0)]),
                ("on".into(), vec![None, Some(8.0)]),
            ],
            &[Rule {
                y: 3.0,
                label: "target 3 %".into(),
            }],
        );
        // Three bars and the frame/background rectangles (2) and legend (2).
        assert_eq!(svg.matches("<rect ").count(), 3 + 2 + 2);
        assert!(svg.contains(">-1.0</text>") && svg.contains(">8.0</text>"));
        assert!(svg.contains("target 3 %"));
    }
}
