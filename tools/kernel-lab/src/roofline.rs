//! The roofline table as markdown (`cargo bench --bench kernels` prints it). The analytic
//! model itself, every kernel's FLOPs, minimum bytes and floor, is `mura::roofline` (the
//! launch plan of `mura bench --plan` reads its floors too); it is re-exported here.

pub use mura::roofline::*;
use std::fmt::Write;

fn si(x: f64, unit: &str) -> String {
    let (v, prefix) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    format!("{v:.3} {prefix}{unit}")
}

/// The table as markdown: a summary per (op, pass), every kernel shape, and step totals.
/// `measured[i]` is the measured time of one launch of `rows[i]` in seconds, or `None`
/// (shown as "not measured"); `batch` is the images per step.
pub fn markdown(rows: &[KernelRow], batch: usize, m: &Machine, measured: &[Option<f64>]) -> String {
    let t = totals(rows, m);
    let mut out = String::new();
    let us = |s: f64| format!("{:.1}", s * 1e6);

    out.push_str(
        "| op | pass | launches | FLOP | bytes | floor ms | share of floor | measured ms \
         | % of floor |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let time = |i: usize| measured.get(i).copied().flatten();
    let mut groups: Vec<(Op, Pass)> = rows.iter().map(|r| (r.op, r.pass)).collect();
    groups.sort_by_key(|&(op, pass)| (pass, op.name()));
    groups.dedup();
    for (op, pass) in groups {
        let g: Vec<(usize, &KernelRow)> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.op == op && r.pass == pass)
            .collect();
        // The group's measured time, when each of its rows has one.
        let meas: Option<f64> = g
            .iter()
            .map(|&(i, r)| time(i).map(|t| r.count as f64 * t))
            .sum();
        let g: Vec<&KernelRow> = g.into_iter().map(|(_, r)| r).collect();
        let launches: u64 = g.iter().map(|r| r.count).sum();
        let flops: u64 = g.iter().map(|r| r.count * r.flops).sum();
        let bytes: u64 = g.iter().map(|r| r.count * r.bytes).sum();
        let floor: f64 = g.iter().map(|r| r.count as f64 * r.floor_s(m)).sum();
        let flops = if flops == 0 {
            "-".into()
        } else {
            si(flops as f64, "FLOP")
        };
        let meas = match meas {
            Some(sec) => format!("{:.3} | {:.0}%", sec * 1e3, 100.0 * floor / sec),
            None => "- | -".into(),
        };
        let _ = writeln!(
            out,
            "| {op} | {pass} | {launches} | {flops} | {} | {:.3} | {:.1}% | {meas} |",
            si(bytes as f64, "B"),
            floor * 1e3,
            100.0 * floor / t.floor_s
        );
    }

    out.push_str(
        "\n| op | pass | site | shape | M | N | K | count | FLOP | bytes | FLOP/B | bound \
         | floor µs | ×count µs | measured µs | TFLOP/s | GB/s | % of floor |\n",
    );
    out.push_str(
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut all_measured = true;
    let mut measured_total = 0.0;
    for (i, r) in rows.iter().enumerate() {
        let (gm, gn, gk) = match r.gemm {
            Some(g) => (g.m.to_string(), g.n.to_string(), g.k.to_string()),
            None => ("".into(), "".into(), "".into()),
        };
        let floor = r.floor_s(m);
        let meas = match time(i) {
            Some(sec) => {
                measured_total += r.count as f64 * sec;
                format!(
                    "{} | {:.1} | {:.0} | {:.0}%",
                    us(sec),
                    r.flops as f64 / sec / 1e12,
                    r.bytes as f64 / sec / 1e9,
                    100.0 * floor / sec
                )
            }
            None => {
                all_measured = false;
                "not measured | | | ".to_string()
            }
        };
        let (flops, intensity) = match r.gemm {
            Some(_) => (
                si(r.flops as f64, "FLOP"),
                format!("{:.0}", r.flops as f64 / r.bytes as f64),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {gm} | {gn} | {gk} | {} | {flops} | {} | {intensity} | {} | {} | {} | {meas} |",
            r.op,
            r.pass,
            r.site,
            r.shape,
            r.count,
            si(r.bytes as f64, "B"),
            r.bound(m),
            us(floor),
            us(r.count as f64 * floor),
        );
    }

    let launches: u64 = rows.iter().map(|r| r.count).sum();
    let _ = writeln!(out, "\nStep totals ({launches} launches, batch {batch}):\n");
    let _ = writeln!(
        out,
        "- FLOPs: {} ({} per image)",
        si(t.flops as f64, "FLOP"),
        si(t.flops as f64 / batch as f64, "FLOP")
    );
    let _ = writeln!(
        out,
        "- minimum bytes: {} ({} per image)",
        si(t.bytes as f64, "B"),
        si(t.bytes as f64 / batch as f64, "B")
    );
    let _ = writeln!(
        out,
        "- all FLOPs at peak: {:.3} ms; all bytes at full bandwidth: {:.3} ms",
        t.compute_s * 1e3,
        t.memory_s * 1e3
    );
    let _ = writeln!(
        out,
        "- **floor (sum of kernel floors): {:.3} ms = {:.0} images/s**",
        t.floor_s * 1e3,
        batch as f64 / t.floor_s
    );
    let _ = writeln!(
        out,
        "- floor with BN statistics in the producers' epilogues: {:.3} ms = {:.0} images/s",
        t.floor_stats_fused_s * 1e3,
        batch as f64 / t.floor_stats_fused_s
    );
    if all_measured {
        let _ = writeln!(
            out,
            "- measured (sum of kernels): {:.3} ms = {:.0} images/s, {:.0}% of floor",
            measured_total * 1e3,
            batch as f64 / measured_total,
            100.0 * t.floor_s / measured_total
        );
    } else {
        let _ = writeln!(out, "- measured: not measured (no GPU timings supplied)");
    }
    out
}
