//! `.pth` import: the fixtures written by real `torch.save` (scripts/make_pth_fixtures.py)
//! in both formats, torchvision's key remap, the fresh head, exact layout checks, and
//! corrupted files.

use mura::rng::Rng;
use mura::spec::DenseNetSpec;
use mura::weights::pth::load_pth_bytes;
use mura::weights::torchvision::remap_legacy_key;
use mura::weights::{
    check_state_dict, import_torchvision, load_pth, load_safetensors, Error, NamedTensor, Problem,
    StateDict, TensorData,
};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    crate::common::fixtures().join(name)
}

fn tiny() -> DenseNetSpec {
    DenseNetSpec::custom(4, vec![2, 2], 8, 2).unwrap()
}

fn expected() -> StateDict {
    load_safetensors(&fixture("tiny_expected.safetensors"))
        .unwrap()
        .state_dict
}

/// The raw import with torchvision's renames applied by hand (no head, no counters).
fn modern_names(sd: StateDict) -> StateDict {
    let tensors = sd
        .tensors
        .into_iter()
        .map(|mut t| {
            let n = t
                .name
                .strip_prefix("module.")
                .unwrap_or(&t.name)
                .to_string();
            t.name = remap_legacy_key(&n).unwrap_or(n);
            t
        })
        .collect();
    StateDict { tensors }
}

fn assert_same_tensors(got: &StateDict, want: &StateDict) {
    assert_eq!(got.tensors.len(), want.tensors.len());
    for w in &want.tensors {
        let g = got
            .get(&w.name)
            .unwrap_or_else(|| panic!("missing {}", w.name));
        assert_eq!(g.shape, w.shape, "{}", w.name);
        assert_eq!(g.data, w.data, "{}", w.name);
    }
}

#[test]
fn both_formats_import_exact_values() {
    let want = expected();
    assert!(want.tensors.len() > 40);
    for f in ["tiny_legacy.pth", "tiny_legacy_v1.pth", "tiny_zip.pth"] {
        let raw = load_pth(&fixture(f)).unwrap();
        // The fixtures carry the 2017 spelling, and no counters.
        assert!(raw
            .tensors
            .iter()
            .any(|t| t.name.ends_with("denselayer1.norm.1.weight")));
        assert!(!raw
            .tensors
            .iter()
            .any(|t| t.name.ends_with("num_batches_tracked")));
        assert_same_tensors(&modern_names(raw), &want);
    }
}

#[test]
fn import_torchvision_remaps_adds_counters_and_replaces_head() {
    let spec = tiny();
    let want = expected();
    let c = spec.num_features();
    for f in ["tiny_legacy.pth", "tiny_legacy_v1.pth", "tiny_zip.pth"] {
        let sd = import_torchvision(load_pth(&fixture(f)).unwrap(), &spec, 7).unwrap();
        check_state_dict(&sd, &spec).unwrap();
        let names: Vec<_> = sd.tensors.iter().map(|t| t.name.clone()).collect();
        let layout: Vec<_> = spec
            .state_dict_layout()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, layout, "layout order");
        for t in &sd.tensors {
            if t.name.ends_with("num_batches_tracked") {
                assert_eq!(t.data, TensorData::I64(vec![0]));
                assert!(t.shape.is_empty());
            } else if !t.name.starts_with("classifier.") {
                assert_eq!(Some(t), want.get(&t.name), "{}", t.name);
            }
        }
        // The 1000-way head is gone; the fresh one is U(-1/sqrt(C), 1/sqrt(C)), bias 0.
        assert_eq!(want.get("classifier.weight").unwrap().shape, vec![1000, c]);
        let w = sd.get("classifier.weight").unwrap();
        assert_eq!(w.shape, vec![1, c]);
        let TensorData::F32(v) = &w.data else {
            panic!()
        };
        let b = 1.0 / (c as f32).sqrt();
        assert!(v.iter().all(|x| x.abs() <= b));
        assert!(v.iter().any(|&x| x > b / 4.0) && v.iter().any(|&x| x < -b / 4.0));
        let distinct: std::collections::HashSet<u32> = v.iter().map(|x| x.to_bits()).collect();
        assert_eq!(distinct.len(), c);
        assert_eq!(
            sd.get("classifier.bias").unwrap().data,
            TensorData::F32(vec![0.0])
        );
    }
    let a = import_torchvision(load_pth(&fixture("tiny_zip.pth")).unwrap(), &spec, 1).unwrap();
    let b = import_torchvision(load_pth(&fixture("tiny_zip.pth")).unwrap(), &spec, 2).unwrap();
    let c1 = import_torchvision(load_pth(&fixture("tiny_zip.pth")).unwrap(), &spec, 1).unwrap();
    assert_ne!(a.get("classifier.weight"), b.get("classifier.weight"));
    assert_eq!(a, c1, "same seed, same head");
}

#[test]
fn wrong_architecture_is_refused_naming_keys() {
    let raw = load_pth(&fixture("tiny_legacy.pth")).unwrap();
    // growth 8 instead of 4: every dense-layer shape differs.
    let other = DenseNetSpec::custom(8, vec![2, 2], 8, 2).unwrap();
    let e = import_torchvision(raw.clone(), &other, 0).unwrap_err();
    let problems = Error::find(&e).expect("a weights error").problems();
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, Problem::Shape { key, .. }
            if key.starts_with("features.denseblock1.denselayer1"))),
        "{e:#}"
    );
    let deeper = DenseNetSpec::custom(4, vec![2, 3], 8, 2).unwrap();
    let e = import_torchvision(raw, &deeper, 0).unwrap_err();
    let problems = Error::find(&e).expect("a weights error").problems();
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, Problem::MissingKey { key, .. }
            if key == "features.denseblock2.denselayer3.norm1.weight")),
        "{e:#}"
    );
}

fn imported() -> StateDict {
    import_torchvision(load_pth(&fixture("tiny_legacy.pth")).unwrap(), &tiny(), 3).unwrap()
}

#[test]
fn check_state_dict_names_missing_unexpected_misshaped_and_mistyped_keys() {
    let spec = tiny();
    let good = imported();
    // The one problem `check_state_dict` finds in `sd`.
    let problem = |sd: &StateDict| match check_state_dict(sd, &spec).unwrap_err() {
        Error::Refused { mut problems, .. } if problems.len() == 1 => problems.remove(0),
        e => panic!("not one problem: {e}"),
    };
    let mut rng = Rng::new(11);
    for _ in 0..4 {
        let i = rng.below(good.tensors.len() as u64) as usize;
        let name = good.tensors[i].name.clone();

        let mut sd = good.clone();
        sd.tensors.remove(i);
        let p = problem(&sd);
        assert!(
            matches!(&p, Problem::MissingKey { key, .. } if *key == name),
            "{p}"
        );

        let mut sd = good.clone();
        let t = &mut sd.tensors[i];
        t.shape.push(1);
        let p = problem(&sd);
        assert!(
            matches!(&p, Problem::Shape { key, .. } if *key == name),
            "{p}"
        );

        let mut sd = good.clone();
        let t = &mut sd.tensors[i];
        t.data = match &t.data {
            TensorData::F32(v) => TensorData::I64(vec![0; v.len()]),
            TensorData::I64(v) => TensorData::F32(vec![0.0; v.len()]),
        };
        let p = problem(&sd);
        assert!(
            matches!(&p, Problem::Dtype { key, .. } if *key == name),
            "{p}"
        );
    }
    let mut sd = good.clone();
    sd.tensors.push(NamedTensor {
        name: "features.denseblock1.denselayer1.norm.1.weight".into(),
        shape: vec![8],
        data: TensorData::F32(vec![1.0; 8]),
    });
    let p = problem(&sd);
    assert!(
        matches!(&p, Problem::UnexpectedKey { key, .. }
            if key == "features.denseblock1.denselayer1.norm.1.weight"),
        "{p}"
    );
    let mut sd = good.clone();
    sd.tensors.push(good.tensors[5].clone());
    let p = problem(&sd);
    assert!(
        matches!(&p, Problem::DuplicateKey { key } if *key == good.tensors[5].name),
        "{p}"
    );
}

#[test]
fn check_state_dict_refuses_values_no_trained_model_holds() {
    let spec = tiny();
    let good = imported();
    check_state_dict(&good, &spec).unwrap();
    // The first element of the tensor whose name ends with `end` set to `v`: the error.
    let with = |end: &str, v: TensorData| {
        let mut sd = good.clone();
        let t = sd
            .tensors
            .iter_mut()
            .find(|t| t.name.ends_with(end))
            .unwrap();
        t.data = match (&t.data, v) {
            (TensorData::F32(old), TensorData::F32(v)) => {
                TensorData::F32([v, old[1..].to_vec()].concat())
            }
            (_, v) => v,
        };
        check_state_dict(&sd, &spec)
    };
    let f = |x: f32| TensorData::F32(vec![x]);
    // Where a value goes, the value, and the one problem it must be.
    type Want = fn(&Problem) -> bool;
    let cases: [(&str, TensorData, Want); 6] = [
        ("conv0.weight", f(f32::NAN), |p| {
            matches!(p, Problem::NotFinite { key, value, element: 0 }
                if key == "features.conv0.weight" && value.is_nan())
        }),
        ("classifier.weight", f(f32::INFINITY), |p| {
            matches!(p, Problem::NotFinite { key, value: f32::INFINITY, element: 0 }
                if key == "classifier.weight")
        }),
        ("norm0.running_mean", f(f32::NEG_INFINITY), |p| {
            matches!(p, Problem::NotFinite { key, value: f32::NEG_INFINITY, .. }
                if key == "features.norm0.running_mean")
        }),
        ("norm5.running_var", f(f32::NAN), |p| {
            matches!(p, Problem::NotFinite { key, value, .. }
                if key == "features.norm5.running_var" && value.is_nan())
        }),
        ("norm0.running_var", f(-1e-3), |p| {
            matches!(p, Problem::Negative { key, what: "variance", value, element: 0 }
                if key == "features.norm0.running_var" && value == "-0.001")
        }),
        (
            "norm0.num_batches_tracked",
            TensorData::I64(vec![-1]),
            |p| matches!(p, Problem::Negative { what: "batch count", value, .. } if value == "-1"),
        ),
    ];
    for (end, v, want) in cases {
        match with(end, v).unwrap_err() {
            Error::Refused { what, problems } => assert!(
                what == "weights hold values no trained model has"
                    && problems.len() == 1
                    && want(&problems[0]),
                "{end}: {what}: {problems:?}"
            ),
            e => panic!("{end}: {e}"),
        }
    }
    assert_eq!(
        with("conv0.weight", f(f32::NAN)).unwrap_err().to_string(),
        "weights hold values no trained model has: key 'features.conv0.weight' holds NaN (element 0)"
    );
    // A variance of 0 (a channel that never varied) and a bias of -1e30 are values a model may hold.
    with("norm0.running_var", f(0.0)).unwrap();
    with("classifier.bias", f(-1e30)).unwrap();
    // An imported `.pth` goes through the same check.
    let mut raw = load_pth(&fixture("tiny_legacy.pth")).unwrap();
    let t = raw
        .tensors
        .iter_mut()
        .find(|t| t.name.ends_with("running_var"))
        .unwrap();
    if let TensorData::F32(v) = &mut t.data {
        v[0] = -2.0;
    }
    let e = import_torchvision(raw, &spec, 3).unwrap_err();
    let problems = Error::find(&e).expect("a weights error").problems();
    assert!(
        matches!(problems, [Problem::Negative { what: "variance", value, .. }] if value == "-2"),
        "{e:#}"
    );
}

fn err(bytes: &[u8]) -> String {
    format!("{:#}", load_pth_bytes(bytes).unwrap_err())
}

#[test]
fn corrupted_files_are_refused_clearly() {
    for f in ["tiny_legacy.pth", "tiny_legacy_v1.pth", "tiny_zip.pth"] {
        let good = std::fs::read(fixture(f)).unwrap();
        // Truncated anywhere: an error, never a panic or a partial load.
        let mut rng = Rng::new(5);
        for _ in 0..30 {
            let cut = rng.below(good.len() as u64) as usize;
            assert!(load_pth_bytes(&good[..cut]).is_err(), "{f} cut at {cut}");
        }
        // Bytes flipped anywhere: never a panic (data bytes of a legacy file carry no
        // checksum, so some flips load).
        for _ in 0..100 {
            let mut bad = good.clone();
            let i = rng.below(bad.len() as u64) as usize;
            bad[i] ^= 1 << rng.below(8);
            let _ = load_pth_bytes(&bad);
        }
    }
    let legacy = std::fs::read(fixture("tiny_legacy.pth")).unwrap();
    let e = err(&legacy[..legacy.len() - 3]);
    assert!(e.contains("truncated checkpoint"), "{e}");
    let mut bad = legacy.clone();
    bad[5] ^= 0x40; // inside the magic number
    let e = err(&bad);
    assert!(e.contains("wrong magic number"), "{e}");
    let e = err(b"\x89PNG\r\n\x1a\n not a checkpoint");
    assert!(e.contains("not a PyTorch checkpoint"), "{e}");
    let e = err(&[]);
    assert!(e.contains("not a PyTorch checkpoint"), "{e}");

    // A flipped byte inside a zip member's data fails its CRC.
    let zip = std::fs::read(fixture("tiny_zip.pth")).unwrap();
    let at = find(&zip, b"tiny_zip/data/0").unwrap() + 200;
    let mut bad = zip.clone();
    bad[at] ^= 0x10;
    let e = err(&bad);
    assert!(e.contains("tiny_zip/data/"), "{e}");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn globals_outside_the_allow_list_are_refused() {
    // The legacy fixture with its OrderedDict global swapped for an equally long name.
    let legacy = std::fs::read(fixture("tiny_legacy.pth")).unwrap();
    let at = find(&legacy, b"collections\nOrderedDict\n").unwrap();
    let mut bad = legacy.clone();
    bad[at..at + 24].copy_from_slice(b"subprocess\nPopen\nXXXXXXX");
    let e = err(&bad);
    assert!(e.contains("not on mura's allow-list"), "{e}");
}
