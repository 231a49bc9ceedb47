//! Analytic roofline of one DenseNet training step: every kernel's FLOPs, minimum bytes
//! and floor time `max(FLOPs / peak, bytes / bandwidth)`.
//!
//! A training step is stem → max pool → dense blocks (transitions between them) → BN+ReLU
//! and global average pool → one logit, then its backward and one Adam update. Each
//! convolution is an implicit GEMM in NHWC, `C[M, N] = A[M, K] · B[K, N]`:
//!
//! | pass       | M              | N              | K              |
//! |------------|----------------|----------------|----------------|
//! | forward    | N·Ho·Wo        | C_out          | C_in·kh·kw     |
//! | bwd-data   | N·Hi·Wi        | C_in           | C_out·kh·kw    |
//! | bwd-weight | C_out          | C_in·kh·kw     | N·Ho·Wo        |
//!
//! with FLOPs = 2·M·N·K (the stride-1 convolutions here have equal FLOPs in all three).
//! The stem has no backward-data kernel: the input image needs no gradient.
//!
//! Minimum bytes: each kernel reads each operand once and writes each result once, in the
//! fused design of `DESIGN.md` (issue 7). The assumptions, precisely:
//! - Activations, activation gradients and the conv weights the GEMMs read are stored at
//!   the step's precision `p` (2 bytes bf16, 4 bytes f32). Weight gradients, master weights,
//!   Adam moments, BN statistics and BN parameters are f32.
//! - BN+ReLU is applied while a convolution loads its input, so the **pre-BN** activation
//!   is what is read; the normalised tensor is never stored. Per-channel scale/shift and
//!   the statistics vectors (a few KB) are not counted.
//! - Dense blocks concatenate without copies: a layer reads a channel prefix of its
//!   block's buffer and writes its `k` new channels into it.
//! - Backward-data of a conv whose input went through BN+ReLU reads that pre-BN input
//!   (ReLU mask, BN-backward reductions in the epilogue). In a dense layer's 1×1 it
//!   accumulates into the block's shared gradient buffer (read + write); the transition,
//!   which runs first in the block's backward, writes it.
//! - BN backward's per-channel correction (`-γ/σ·(mean(g) + x̂·mean(g·x̂))`, affine in x̂)
//!   is summed per channel over all of the channel's consumers and applied when the
//!   channel's producer loads its output gradient; so a backward kernel whose output `y`
//!   feeds a BN reads `y` (pre-BN) next to `dy`.
//! - BN forward statistics are listed as their own passes (`bn_stats`: read the produced
//!   tensor once); computed in the producer's epilogue they cost no bytes, and
//!   [`Totals::floor_stats_fused_s`] is the floor without them.
//! - Max pool and avg pool are their own kernels (BN+ReLU fused into the max pool's load);
//!   the head (BN+ReLU+global average pool) is one kernel each way; the classifier, loss
//!   and BN parameter gradients (O(N·C) work) and the augmentation kernel are not counted.
//! - Memory-bound kernels' arithmetic is not counted (it is ≪ bytes × the ridge point).
//! - Adam reads param, grad, m, v and writes param, m, v (f32), plus the low-precision
//!   weight copy when bf16; weight gradients are written, not accumulated, so no zeroing.
//!
//! The floor of the step is the sum of its kernels' floors (they run one after another).

use crate::spec::DenseNetSpec;
use anyhow::{bail, Result};
use std::fmt::{self, Write};
use std::str::FromStr;

/// Storage precision of activations, activation gradients and GEMM weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Bf16,
    F32,
}

impl Precision {
    /// Bytes per stored element.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::Bf16 => 2,
            Precision::F32 => 4,
        }
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(Precision::Bf16),
            "f32" => Ok(Precision::F32),
            _ => bail!("unknown precision '{s}': use bf16 or f32"),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        })
    }
}

/// The peak rates floors are computed against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Machine {
    /// FLOP/s of dense matrix math at the step's precision.
    pub peak_flops: f64,
    /// Bytes/s of device memory.
    pub bandwidth: f64,
}

impl Machine {
    /// H100 SXM: 800 TFLOP/s bf16 dense (measured, DESIGN.md), 67 TFLOP/s f32 without
    /// tensor cores (datasheet), 3.0 TB/s HBM3 (measured).
    pub fn h100(precision: Precision) -> Machine {
        Machine {
            peak_flops: match precision {
                Precision::Bf16 => 800e12,
                Precision::F32 => 67e12,
            },
            bandwidth: 3.0e12,
        }
    }
}

/// Which part of the step a kernel belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pass {
    Fwd,
    BwdData,
    BwdWeight,
    /// Backward of a memory-bound op.
    Bwd,
    Update,
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pass::Fwd => "fwd",
            Pass::BwdData => "bwd-data",
            Pass::BwdWeight => "bwd-weight",
            Pass::Bwd => "bwd",
            Pass::Update => "update",
        })
    }
}

/// GEMM dimensions of a convolution pass: `C[M, N] = A[M, K] · B[K, N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub m: u64,
    pub n: u64,
    pub k: u64,
}

/// One distinct kernel shape of the step and how many times it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelRow {
    /// `stem7x7s2`, `conv1x1`, `conv3x3`, `trans1x1`, `maxpool`, `avgpool`, `bn_stats`,
    /// `head` (BN+ReLU+global average pool) or `adam`.
    pub op: &'static str,
    pub pass: Pass,
    /// `stem`, `block2`, `trans1`, `head`, `all`.
    pub site: String,
    /// Spatial size and channels, e.g. `56x56 128->32` (batch is the table's).
    pub shape: String,
    /// `None` for memory-bound ops.
    pub gemm: Option<Gemm>,
    /// Launches of this shape per step.
    pub count: u64,
    /// Per launch.
    pub flops: u64,
    /// Per launch (minimum; see the module docs).
    pub bytes: u64,
}

impl KernelRow {
    /// Floor of one launch, seconds.
    pub fn floor_s(&self, m: &Machine) -> f64 {
        (self.flops as f64 / m.peak_flops).max(self.bytes as f64 / m.bandwidth)
    }

    /// `"compute"` or `"memory"`: which term sets the floor.
    pub fn bound(&self, m: &Machine) -> &'static str {
        if self.flops as f64 / m.peak_flops >= self.bytes as f64 / m.bandwidth {
            "compute"
        } else {
            "memory"
        }
    }
}

/// Sums over a whole step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Totals {
    pub flops: u64,
    pub bytes: u64,
    /// Sum of every launch's floor.
    pub floor_s: f64,
    /// The same without the separate `bn_stats` passes (statistics in producer epilogues).
    pub floor_stats_fused_s: f64,
    /// `flops / peak`: the step if it were all at peak compute.
    pub compute_s: f64,
    /// `bytes / bandwidth`.
    pub memory_s: f64,
}

pub fn totals(rows: &[KernelRow], m: &Machine) -> Totals {
    let flops: u64 = rows.iter().map(|r| r.count * r.flops).sum();
    let bytes: u64 = rows.iter().map(|r| r.count * r.bytes).sum();
    let floor = |keep: &dyn Fn(&KernelRow) -> bool| -> f64 {
        rows.iter()
            .filter(|r| keep(r))
            .map(|r| r.count as f64 * r.floor_s(m))
            .sum()
    };
    Totals {
        flops,
        bytes,
        floor_s: floor(&|_| true),
        floor_stats_fused_s: floor(&|r| r.op != "bn_stats"),
        compute_s: flops as f64 / m.peak_flops,
        memory_s: bytes as f64 / m.bandwidth,
    }
}

/// Collects rows, merging launches of identical shape.
struct Rows {
    rows: Vec<KernelRow>,
}

impl Rows {
    fn push(&mut self, row: KernelRow) {
        let same = |r: &&mut KernelRow| {
            r.op == row.op && r.pass == row.pass && r.site == row.site && r.shape == row.shape
        };
        match self.rows.iter_mut().find(same) {
            Some(r) => r.count += row.count,
            None => self.rows.push(row),
        }
    }
}

/// How a conv's backward-data kernel writes its input gradient.
#[derive(Clone, Copy, PartialEq)]
enum Dx {
    /// No backward-data kernel (the stem: the image needs no gradient).
    None,
    Write,
    /// Add into the dense block's shared gradient buffer (read + write).
    Accumulate,
}

/// One convolution: input `[n, hi, hi, cin]`, output `[n, ho, ho, cout]`, `kk` taps.
struct Conv<'a> {
    op: &'static str,
    site: &'a str,
    hi: u64,
    ho: u64,
    cin: u64,
    cout: u64,
    kk: u64,
    dx: Dx,
    /// The output feeds a BN whose backward correction is applied when `dy` is loaded,
    /// so backward kernels also read the output `y`.
    y_feeds_bn: bool,
}

/// The step's kernels: forward rows in order, and backward groups (one per forward op,
/// in that op's backward order) in forward order, replayed reversed.
struct Step {
    fwd: Rows,
    bwd: Vec<Vec<KernelRow>>,
    n: u64,
    p: u64,
}

impl Step {
    fn conv(&mut self, c: Conv) {
        let (n, p) = (self.n, self.p);
        let (pi, po) = (n * c.hi * c.hi, n * c.ho * c.ho);
        let x = pi * c.cin * p; // [n, hi, hi, cin], pre-BN
        let y = po * c.cout * p; // [n, ho, ho, cout], pre-BN
        let w = c.cout * c.cin * c.kk * p; // [cout, kh, kw, cin]
        let shape = if c.hi == c.ho {
            format!("{0}x{0} {1}->{2}", c.hi, c.cin, c.cout)
        } else {
            format!("{0}x{0}->{1}x{1} {2}->{3}", c.hi, c.ho, c.cin, c.cout)
        };
        let row = |pass, g: Gemm, bytes| KernelRow {
            op: c.op,
            pass,
            site: c.site.to_string(),
            shape: shape.clone(),
            gemm: Some(g),
            count: 1,
            flops: 2 * g.m * g.n * g.k,
            bytes,
        };
        let dy_read = if c.y_feeds_bn { 2 * y } else { y };
        let fwd = Gemm {
            m: po,
            n: c.cout,
            k: c.cin * c.kk,
        };
        self.fwd.push(row(Pass::Fwd, fwd, x + w + y));
        let wgrad = Gemm {
            m: c.cout,
            n: c.cin * c.kk,
            k: po,
        };
        let mut bwd = vec![row(
            Pass::BwdWeight,
            wgrad,
            x + dy_read + c.cout * c.cin * c.kk * 4,
        )];
        let dx = match c.dx {
            Dx::None => 0,
            Dx::Write => x,
            Dx::Accumulate => 2 * x,
        };
        if c.dx != Dx::None {
            let dgrad = Gemm {
                m: pi,
                n: c.cin,
                k: c.cout * c.kk,
            };
            // The ReLU mask and the BN reductions need the pre-BN input: + x.
            bwd.push(row(Pass::BwdData, dgrad, dy_read + w + x + dx));
        }
        self.bwd.push(bwd);
    }

    /// A memory-bound op: forward bytes and backward bytes (`None`: no backward kernel).
    fn mem(&mut self, op: &'static str, site: &str, shape: String, fwd: u64, bwd: Option<u64>) {
        let row = |pass, bytes| KernelRow {
            op,
            pass,
            site: site.to_string(),
            shape: shape.clone(),
            gemm: None,
            count: 1,
            flops: 0,
            bytes,
        };
        self.fwd.push(row(Pass::Fwd, fwd));
        if let Some(b) = bwd {
            self.bwd.push(vec![row(Pass::Bwd, b)]);
        }
    }

    /// A BN statistics pass over `[n, h, h, c]` (sum and sum of squares per channel).
    fn bn_stats(&mut self, site: &str, h: u64, c: u64) {
        let bytes = self.n * h * h * c * self.p + 2 * c * 4;
        self.mem("bn_stats", site, format!("{h}x{h} {c}"), bytes, None);
    }
}

/// Spatial sizes: (stem output, block inputs...). Errors if a feature map vanishes.
fn spatial(spec: &DenseNetSpec, s: usize) -> Result<(u64, Vec<u64>)> {
    let s = s as u64;
    if s == 0 {
        bail!("image size must be positive");
    }
    let h0 = (s - 1) / 2 + 1; // 7x7 stride 2 pad 3
    let mut h = (h0 - 1) / 2 + 1; // 3x3 max pool stride 2 pad 1
    let mut hs = vec![h];
    for _ in 1..spec.block_config.len() {
        h /= 2; // 2x2 avg pool stride 2
        if h == 0 {
            bail!(
                "image size {s} is too small for {} dense blocks: the feature map vanishes; use a larger image size",
                spec.block_config.len()
            );
        }
        hs.push(h);
    }
    Ok((h0, hs))
}

/// Every kernel of one training step of `spec` at batch `n`, square images of side `s`,
/// storing activations in `precision`; identical shapes grouped, in execution order
/// (forward, then backward, then the optimiser).
pub fn table(
    spec: &DenseNetSpec,
    n: usize,
    s: usize,
    precision: Precision,
) -> Result<Vec<KernelRow>> {
    if n == 0 {
        bail!("batch size must be positive");
    }
    let (h0, hs) = spatial(spec, s)?;
    let (n, s, p) = (n as u64, s as u64, precision.bytes());
    let k = spec.growth_rate as u64;
    let mid = (spec.bn_size * spec.growth_rate) as u64;
    let f0 = spec.num_init_features as u64;
    let (ins, c_final) = spec.block_input_channels();
    let mut st = Step {
        fwd: Rows { rows: Vec::new() },
        bwd: Vec::new(),
        n,
        p,
    };

    // Stem: conv 7x7/2 (image -> x0), BN0 statistics, BN0+ReLU+max pool into block 1.
    st.conv(Conv {
        op: "stem7x7s2",
        site: "stem",
        hi: s,
        ho: h0,
        cin: 3,
        cout: f0,
        kk: 49,
        dx: Dx::None,
        y_feeds_bn: true,
    });
    st.bn_stats("stem", h0, f0);
    let h1 = hs[0];
    let (x0, pooled) = (n * h0 * h0 * f0 * p, n * h1 * h1 * f0 * p);
    // Backward: dy and the pooled output (BN correction), x0 (argmax, mask) -> dx0.
    let shape = format!("{h0}x{h0}->{h1}x{h1} {f0}");
    st.mem(
        "maxpool",
        "stem",
        shape,
        x0 + pooled,
        Some(2 * pooled + 2 * x0),
    );
    st.bn_stats("stem", h1, f0);

    let nblocks = spec.block_config.len();
    for (b, &layers) in spec.block_config.iter().enumerate() {
        let h = hs[b];
        let site = format!("block{}", b + 1);
        for l in 0..layers as u64 {
            let c = ins[b] as u64 + l * k;
            st.conv(Conv {
                op: "conv1x1",
                site: &site,
                hi: h,
                ho: h,
                cin: c,
                cout: mid,
                kk: 1,
                dx: Dx::Accumulate,
                y_feeds_bn: true,
            });
            st.bn_stats(&site, h, mid);
            st.conv(Conv {
                op: "conv3x3",
                site: &site,
                hi: h,
                ho: h,
                cin: mid,
                cout: k,
                kk: 9,
                dx: Dx::Write,
                y_feeds_bn: true,
            });
            st.bn_stats(&site, h, k);
        }
        if b + 1 < nblocks {
            let c = ins[b] as u64 + layers as u64 * k;
            let (c2, h2) = (c / 2, hs[b + 1]);
            let site = format!("trans{}", b + 1);
            st.conv(Conv {
                op: "trans1x1",
                site: &site,
                hi: h,
                ho: h,
                cin: c,
                cout: c2,
                kk: 1,
                dx: Dx::Write,
                y_feeds_bn: false,
            });
            let (full, pooled) = (n * h * h * c2 * p, n * h2 * h2 * c2 * p);
            // Backward: dy and the pooled output (BN correction) -> d(conv output).
            let shape = format!("{h}x{h}->{h2}x{h2} {c2}");
            st.mem(
                "avgpool",
                &site,
                shape,
                full + pooled,
                Some(2 * pooled + full),
            );
            st.bn_stats(&site, h2, c2);
        }
    }

    // Head: BN5 + ReLU + global average pool -> features [n, c_final] f32.
    let (hf, cf) = (hs[nblocks - 1], c_final as u64);
    let x = n * hf * hf * cf * p;
    let shape = format!("{hf}x{hf} {cf}");
    st.mem(
        "head",
        "head",
        shape,
        x + n * cf * 4,
        Some(2 * x + n * cf * 4),
    );

    let mut rows = st.fwd;
    for group in st.bwd.into_iter().rev() {
        for r in group {
            rows.push(r);
        }
    }
    let params = spec.num_params() as u64;
    let copy = if precision == Precision::F32 { 0 } else { p };
    rows.push(KernelRow {
        op: "adam",
        pass: Pass::Update,
        site: "all".into(),
        shape: format!("{params} params"),
        gemm: None,
        count: 1,
        flops: 0,
        bytes: params * (7 * 4 + copy),
    });
    Ok(rows.rows)
}

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
    let mut groups: Vec<(&str, Pass)> = rows.iter().map(|r| (r.op, r.pass)).collect();
    groups.sort_by_key(|&(op, pass)| (pass, op));
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
