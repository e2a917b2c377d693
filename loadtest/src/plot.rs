//! SVG plot of a report's time series: latency percentiles (log scale) on
//! top, throughput below, phases shaded, one colour per operation. Plain SVG
//! text with no dependencies, readable in any browser and in review diffs.

use crate::report::Report;
use std::collections::BTreeSet;
use std::fmt::Write as _;

const W: f64 = 960.0;
const PANEL_H: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the plot.
pub fn svg(report: &Report) -> String {
    let series = &report.series;
    let ops: Vec<String> = series
        .iter()
        .flat_map(|p| p.ops.keys().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let t_max = series.iter().map(|p| p.t_s).fold(1.0_f64, f64::max);
    let plot_w = W - LEFT - RIGHT;
    let x = |t: f64| LEFT + plot_w * (t / t_max);
    let total_h = TOP + 2.0 * PANEL_H + GAP + 50.0;

    // Latency panel: log10 of milliseconds, from 0.1 ms up to the worst p99.
    let lat_max_ms = series
        .iter()
        .flat_map(|p| p.ops.values().map(|o| o.p99_us as f64 / 1000.0))
        .fold(1.0_f64, f64::max);
    let (lo, hi) = (-1.0_f64, lat_max_ms.log10().ceil().max(0.0));
    let lat_top = TOP;
    let y_lat = |ms: f64| {
        let v = ms.max(0.1).log10().clamp(lo, hi);
        lat_top + PANEL_H * (1.0 - (v - lo) / (hi - lo))
    };
    // Throughput panel: linear ok/s.
    let rate = |ok: u64, dt: f64| if dt > 0.0 { ok as f64 / dt } else { 0.0 };
    let thr_max = series
        .iter()
        .flat_map(|p| p.ops.values().map(move |o| rate(o.ok, p.dt_s)))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let thr_top = TOP + PANEL_H + GAP;
    let y_thr = |v: f64| thr_top + PANEL_H * (1.0 - v / thr_max);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total_h}" viewBox="0 0 {W} {total_h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!(
        "{} — {}",
        report
            .server
            .server_header
            .as_deref()
            .unwrap_or(&report.target),
        report
            .plan
            .scenarios
            .iter()
            .map(|s| format!("{s:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="15">{}</text>"#,
        esc(&title)
    );

    // Phases, shaded in both panels.
    for (i, p) in report.phases.iter().enumerate() {
        let fill = if i % 2 == 0 { "#f4f4f4" } else { "#e8eef6" };
        for top in [lat_top, thr_top] {
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{top}" width="{:.1}" height="{PANEL_H}" fill="{fill}"/>"#,
                x(p.start_s),
                (x(p.end_s) - x(p.start_s)).max(0.0)
            );
        }
        // Label phases wide enough to hold their name.
        let width = x(p.end_s) - x(p.start_s);
        if width >= 7.0 * p.name.len() as f64 + 6.0 {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#666">{}</text>"##,
                x(p.start_s) + 3.0,
                lat_top + 14.0,
                esc(&p.name)
            );
        }
    }

    // Axes and grid.
    for top in [lat_top, thr_top] {
        let _ = writeln!(
            s,
            r#"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="black"/>"#
        );
    }
    let mut e = lo as i32;
    while f64::from(e) <= hi {
        let ms = 10f64.powi(e);
        let y = y_lat(ms);
        let label = if ms < 1.0 {
            format!("{ms}ms")
        } else if ms < 1000.0 {
            format!("{ms:.0}ms")
        } else {
            format!("{:.0}s", ms / 1000.0)
        };
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ccc"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"#,
            LEFT - 5.0,
            y + 4.0
        );
        e += 1;
    }
    for k in 0..=4 {
        let v = thr_max * f64::from(k) / 4.0;
        let y = y_thr(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ccc"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"#,
            LEFT - 5.0,
            y + 4.0
        );
    }
    let ticks = 10;
    for k in 0..=ticks {
        let t = t_max * f64::from(k) / f64::from(ticks);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t:.0}s</text>"#,
            x(t),
            thr_top + PANEL_H + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{:.1}">latency p50 (thin) and p99 (thick), log scale</text>"#,
        lat_top - 6.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{:.1}">throughput, successful operations per second</text>"#,
        thr_top - 6.0
    );

    // Lines, one colour per operation.
    for (i, op) in ops.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts = |f: &dyn Fn(&crate::metrics::IntervalOp, f64) -> Option<f64>,
                   y: &dyn Fn(f64) -> f64| {
            series
                .iter()
                .filter_map(|p| {
                    p.ops
                        .get(op)
                        .and_then(|o| f(o, p.dt_s))
                        .map(|v| format!("{:.1},{:.1}", x(p.t_s), y(v)))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let p50 = pts(
            &|o, _| (o.ok > 0).then_some(o.p50_us as f64 / 1000.0),
            &y_lat,
        );
        let p99 = pts(
            &|o, _| (o.ok > 0).then_some(o.p99_us as f64 / 1000.0),
            &y_lat,
        );
        let thr = pts(&|o, dt| Some(rate(o.ok, dt)), &y_thr);
        for (points, width) in [(p50, 1.0), (p99, 2.5)] {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="{width}" points="{points}"/>"#
            );
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{thr}"/>"#
        );
        let ly = TOP + 10.0 + 18.0 * i as f64;
        let lx = LEFT + plot_w + 15.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{:.1}" width="12" height="12" fill="{colour}"/>"#,
            ly - 10.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{ly:.1}">{}</text>"#,
            lx + 18.0,
            esc(op)
        );
    }
    let g = &report.generator;
    let cpu = g
        .load_phase_cpu_percent_of_one_core
        .unwrap_or(g.cpu_percent_of_one_core);
    // Several threads: also per thread, so saturation shows whatever N is.
    let threads = if g.threads > 1 {
        format!(
            " over {} threads ({:.0}% of {} cores)",
            g.threads,
            cpu / f64::from(g.threads),
            g.threads
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="{:.1}" fill="#444">generator CPU {cpu:.0}% of one core{threads}{}; {} cores, {:.1} GiB</text>"##,
        total_h - 12.0,
        if g.saturated { " (SATURATED)" } else { "" },
        report.machine.cores,
        report.machine.mem_total_kib as f64 / 1048576.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Plan;
    use crate::delivery::DeliveryCounts;
    use crate::metrics::{Op, Recorder};
    use crate::report::{GeneratorStats, RoomStats, ServerInfo, UserStats};
    use crate::sys::Machine;
    use std::time::{Duration, Instant};

    #[test]
    fn plot_has_a_line_per_operation_and_phase_labels() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut rec = Recorder::new(t0);
        rec.phase("load", t0);
        for s in 0..5u64 {
            for i in 0..10 {
                rec.ok(Op::Send, ms(s * 1000 + i * 100), ms(s * 1000 + i * 100 + 3));
                rec.ok(
                    Op::Delivery,
                    ms(s * 1000 + i * 100),
                    ms(s * 1000 + i * 100 + 30),
                );
            }
            rec.tick(ms((s + 1) * 1000), 3.0, None);
        }
        rec.phase("drain<&>", ms(5000));
        rec.end_phase(ms(9000));
        let report = crate::report::Report::build(
            &Plan::default(),
            0,
            ServerInfo::default(),
            Machine::default(),
            GeneratorStats::default(),
            UserStats::default(),
            RoomStats::default(),
            DeliveryCounts::default(),
            &rec,
        );
        let svg = svg(&report);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Two operations, three polylines each (p50, p99, throughput).
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert!(svg.contains(">send<") && svg.contains(">delivery<"));
        assert!(svg.contains("drain&lt;&amp;&gt;"), "labels are escaped");
        // Every point of each line: 5 intervals.
        let first = svg
            .lines()
            .find(|l| l.starts_with("<polyline"))
            .expect("a polyline");
        assert_eq!(first.matches(',').count(), 5);
        assert!(svg.contains("generator CPU 0% of one core;"), "{svg}");
        let mut report = report;
        report.generator.threads = 4;
        report.generator.cpu_percent_of_one_core = 200.0;
        let svg = super::svg(&report);
        assert!(
            svg.contains("generator CPU 200% of one core over 4 threads (50% of 4 cores);"),
            "{svg}"
        );
    }
}
