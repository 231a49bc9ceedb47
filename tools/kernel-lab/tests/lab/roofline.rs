//! The analytic roofline table against independent counts of DenseNet's work.

use mura::precision::Precision;
use mura::spec::{DenseNetSpec, Role};
use mura_kernel_lab::roofline::{markdown, table, totals, KernelRow, Machine, Op, Pass, Site};

fn d169() -> DenseNetSpec {
    DenseNetSpec::preset("densenet169").unwrap()
}

/// Forward MACs of the rows whose op is `op`.
fn fwd_macs(rows: &[KernelRow], op: Op) -> f64 {
    rows.iter()
        .filter(|r| r.op == op && r.pass == Pass::Fwd)
        .map(|r| (r.count * r.flops) as f64 / 2.0)
        .sum()
}

#[test]
fn densenet169_forward_macs_match_design_figures() {
    let rows = table(&d169(), 1, 224, Precision::Bf16).unwrap();
    let ops = [Op::Conv1x1, Op::Conv3x3, Op::Trans1x1, Op::Stem7x7s2];
    // The table counts what mura runs: each transition's 1×1 after its pool, at a quarter of
    // the pixels; the published figures are torchvision's (conv, then pool).
    let torchvision = |op| match op {
        Op::Trans1x1 => 4.0 * fwd_macs(&rows, op),
        _ => fwd_macs(&rows, op),
    };
    let total: f64 = ops.iter().map(|&op| torchvision(op)).sum();
    // The published figure: 3.36 GMAC forward per image at 224².
    assert!((total / 3.36e9 - 1.0).abs() < 0.01, "total {total}");
    // 1x1 46%, 3x3 40%, transitions 11%, stem 3.5%.
    for (&op, share) in ops.iter().zip([0.46, 0.40, 0.11, 0.035]) {
        let got = torchvision(op) / total;
        assert!((got - share).abs() < 0.01, "{op}: {got} vs {share}");
    }
    let mura: f64 = ops.iter().map(|&op| fwd_macs(&rows, op)).sum();
    assert!(
        (mura / (total * (1.0 - 0.75 * 0.11)) - 1.0).abs() < 0.01,
        "{mura}"
    );
}

#[test]
fn every_conv_pass_has_the_forward_flops_and_the_stem_has_no_data_gradient() {
    let rows = table(&d169(), 3, 224, Precision::Bf16).unwrap();
    for op in [Op::Conv1x1, Op::Conv3x3, Op::Trans1x1, Op::Stem7x7s2] {
        let sum = |pass| -> u64 {
            rows.iter()
                .filter(|r| r.op == op && r.pass == pass)
                .map(|r| r.count * r.flops)
                .sum()
        };
        let f = sum(Pass::Fwd);
        assert!(f > 0);
        assert_eq!(sum(Pass::BwdWeight), f, "{op}");
        let d = sum(Pass::BwdData);
        if op == Op::Stem7x7s2 {
            assert_eq!(d, 0);
        } else {
            assert_eq!(d, f, "{op}");
        }
    }
    for r in &rows {
        if let Some(g) = r.gemm {
            assert_eq!(r.flops, 2 * g.m * g.n * g.k);
        } else {
            assert_eq!(r.flops, 0, "{}", r.op);
        }
    }
    // ≈ 20 GFLOP per image per training step (the published figure): 3 × 2 × 3.36 G minus the stem's
    // absent data gradient, as torchvision orders the transitions (mura's 1×1s after their
    // pools do a quarter of theirs).
    let trans: u64 = rows
        .iter()
        .filter(|r| r.op == Op::Trans1x1)
        .map(|r| r.count * r.flops)
        .sum();
    let flops = totals(&rows, &Machine::h100(Precision::Bf16)).flops + 3 * trans;
    let per_image = flops as f64 / 3.0;
    assert!((per_image / 20e9 - 1.0).abs() < 0.02, "{per_image}");
}

#[test]
fn forward_weights_are_exactly_the_state_dict_convolutions() {
    for arch in ["densenet121", "densenet169", "densenet201", "densenet161"] {
        let spec = DenseNetSpec::preset(arch).unwrap();
        let rows = table(&spec, 2, 224, Precision::F32).unwrap();
        let from_table: u64 = rows
            .iter()
            .filter(|r| r.pass == Pass::Fwd)
            .filter_map(|r| r.gemm.map(|g| r.count * g.n * g.k))
            .sum();
        let from_layout: u64 = spec
            .state_dict_layout()
            .iter()
            .filter(|t| t.role == Role::Param && t.shape.len() == 4)
            .map(|t| t.numel() as u64)
            .sum();
        assert_eq!(from_table, from_layout, "{arch}");
        let conv_fwd: u64 = rows
            .iter()
            .filter(|r| r.pass == Pass::Fwd && r.gemm.is_some())
            .map(|r| r.count)
            .sum();
        let layers: usize = spec.block_config.iter().sum();
        assert_eq!(
            conv_fwd as usize,
            1 + 2 * layers + spec.block_config.len() - 1
        );
    }
}

#[test]
fn grouping_and_hand_counted_bytes() {
    let n = 5u64;
    let rows = table(&d169(), n as usize, 224, Precision::Bf16).unwrap();
    let find = |op: Op, pass: Pass, site: Site| -> Vec<&KernelRow> {
        rows.iter()
            .filter(|r| r.op == op && r.pass == pass && r.site == site)
            .collect()
    };
    // Block 3's 32 identical 3x3 convs are one row; its 32 1x1s have 32 distinct widths.
    let three = find(Op::Conv3x3, Pass::Fwd, Site::Block(2));
    assert_eq!(three.len(), 1);
    assert_eq!(three[0].count, 32);
    assert_eq!(three[0].shape.to_string(), "14x14 128->32");
    assert_eq!(find(Op::Conv1x1, Pass::Fwd, Site::Block(2)).len(), 32);
    // Block 1's 3x3 forward, bf16: read x [n,56,56,128], W [32,3,3,128]; write y [n,56,56,32].
    let one = find(Op::Conv3x3, Pass::Fwd, Site::Block(0))[0];
    let px = n * 56 * 56;
    assert_eq!(one.bytes, 2 * (px * 128 + 32 * 9 * 128 + px * 32));
    let g = one.gemm.unwrap();
    assert_eq!((g.m, g.n, g.k), (px, 32, 1152));
    // Block 2's first 1x1 data gradient: dy and y [px,128], W [128,128], x [px,128] for
    // the mask, and read-modify-write of the block's gradient buffer [px,128].
    let px2 = n * 28 * 28;
    let d = find(Op::Conv1x1, Pass::BwdData, Site::Block(1))
        .into_iter()
        .find(|r| r.shape.to_string() == "28x28 128->128")
        .unwrap();
    assert_eq!(
        d.bytes,
        2 * (2 * px2 * 128 + 128 * 128 + px2 * 128 + 2 * px2 * 128)
    );
    // Stem weight gradient: image [n,224,224,3], dy and y [n,112,112,64], dW f32.
    let s = find(Op::Stem7x7s2, Pass::BwdWeight, Site::Stem)[0];
    assert_eq!(
        s.bytes,
        2 * (n * 224 * 224 * 3 + 2 * n * 112 * 112 * 64) + 4 * 64 * 147
    );
    // f32 doubles every activation byte.
    let rows32 = table(&d169(), n as usize, 224, Precision::F32).unwrap();
    let one32 = rows32
        .iter()
        .find(|r| r.op == Op::Conv3x3 && r.pass == Pass::Fwd && r.site == Site::Block(0))
        .unwrap();
    assert_eq!(one32.bytes, 2 * one.bytes);
}

#[test]
fn floor_is_the_larger_term_and_the_step_is_memory_bound() {
    let m = Machine::h100(Precision::Bf16);
    let rows = table(&d169(), 64, 224, Precision::Bf16).unwrap();
    for r in &rows {
        let f = r.floor_s(&m);
        assert_eq!(f, (r.flops as f64 / 800e12).max(r.bytes as f64 / 3e12));
    }
    let t = totals(&rows, &m);
    let sum: f64 = rows.iter().map(|r| r.count as f64 * r.floor_s(&m)).sum();
    assert_eq!(t.floor_s, sum);
    assert!(t.floor_s >= t.compute_s.max(t.memory_s));
    assert!(t.floor_stats_fused_s < t.floor_s);
    // A very fast memory makes the convolutions compute-bound.
    let fast = Machine {
        peak_flops: 800e12,
        bandwidth: 1e18,
    };
    let conv = rows.iter().find(|r| r.op == Op::Conv3x3).unwrap();
    assert_eq!(conv.bound(&fast), "compute");
    assert_eq!(conv.bound(&m), "memory");
}

#[test]
fn markdown_says_not_measured_without_times_and_uses_given_times() {
    let spec = DenseNetSpec::custom(8, vec![2, 3], 16, 2).unwrap();
    let m = Machine::h100(Precision::Bf16);
    let rows = table(&spec, 4, 64, Precision::Bf16).unwrap();
    let md = markdown(&rows, 4, &m, &[]);
    assert!(md.contains("not measured"));
    assert!(!md.contains("measured (sum of kernels)"));
    // Every row measured at exactly twice its floor: 50% of floor everywhere.
    let times: Vec<Option<f64>> = rows.iter().map(|r| Some(2.0 * r.floor_s(&m))).collect();
    let md = markdown(&rows, 4, &m, &times);
    assert!(!md.contains("not measured"));
    assert!(md.contains("measured (sum of kernels)"));
    assert!(md.contains("50% of floor"));
    // ... in every shape's row and in every (op, pass) group's summary row.
    let mut groups: Vec<_> = rows.iter().map(|r| (r.op, r.pass)).collect();
    groups.sort();
    groups.dedup();
    assert_eq!(md.matches("| 50% |").count(), rows.len() + groups.len());
}

#[test]
fn bad_inputs_are_errors() {
    let e = table(&d169(), 64, 16, Precision::Bf16).unwrap_err();
    assert!(e.to_string().contains("too small"), "{e}");
    assert!(table(&d169(), 0, 224, Precision::Bf16).is_err());
    assert!(table(&d169(), 1, 0, Precision::Bf16).is_err());
    assert!("fp16".parse::<Precision>().is_err());
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
}

#[test]
fn rows_name_ops_sites_and_shapes_as_the_markdown_shows_them() {
    let spec = d169();
    let rows = table(&spec, 2, 224, Precision::Bf16).unwrap();
    let names = |r: &KernelRow| format!("{} {} {} {}", r.op, r.pass, r.site, r.shape);
    let first: Vec<String> = rows[..4].iter().map(names).collect();
    assert_eq!(
        first,
        [
            "stem7x7s2 fwd stem 224x224->112x112 3->64",
            "bn_stats fwd stem 112x112 64",
            "maxpool fwd stem 112x112->56x56 64",
            "bn_stats fwd stem 56x56 64",
        ]
    );
    let pool = rows.iter().position(|r| r.op == Op::AvgPool).unwrap();
    assert_eq!(names(&rows[pool]), "avgpool fwd trans1 56x56->28x28 256");
    // The pool before the 1×1, as the model runs them.
    assert_eq!(names(&rows[pool + 1]), "trans1x1 fwd trans1 28x28 256->128");
    let head = rows.iter().find(|r| r.op == Op::Head).unwrap();
    assert_eq!(names(head), "head fwd head 7x7 1664");
    let adam = rows.last().unwrap();
    let params = spec.num_params();
    assert_eq!(names(adam), format!("adam update all {params} params"));
    assert_eq!(Site::Block(1).to_string(), "block2");
    // Every row carries the batch and precision it was built for.
    assert!(rows.iter().all(|r| r.precision == Precision::Bf16));
    assert!(rows[..rows.len() - 1]
        .iter()
        .all(|r| r.shape.batch() == Some(2)));
}
