//! safetensors checkpoints: exact round trip (values, shapes, scalar counters, metadata),
//! interop with a file written by another writer, and clear refusals.

use crate::common::gpu::seed;
use crate::common::tmp;
use mura::rng::Rng;
use mura::spec::DenseNetSpec;
use mura::weights::safetensors::{from_safetensors_bytes, to_safetensors_bytes};
use mura::weights::{
    check_state_dict, load_safetensors, save_safetensors, Error, NamedTensor, Problem, StateDict,
    TensorData,
};
use std::collections::HashMap;

/// A state dict of `spec`'s layout with fresh random values (counters random too).
fn random_state_dict(spec: &DenseNetSpec, seed: u64) -> StateDict {
    let mut rng = Rng::new(seed);
    let tensors = spec
        .state_dict_layout()
        .into_iter()
        .map(|s| {
            let n = s.numel();
            let data = if s.shape.is_empty() {
                TensorData::I64(vec![rng.below(1 << 40) as i64])
            } else {
                // (A variance is never negative: `check_state_dict` refuses one.)
                let var = s.name.ends_with("running_var");
                let draw = |x: f64| if var { x.abs() } else { x } as f32;
                TensorData::F32((0..n).map(|_| draw(rng.normal())).collect())
            };
            NamedTensor {
                name: s.name,
                shape: s.shape,
                data,
            }
        })
        .collect();
    StateDict { tensors }
}

fn sorted(mut sd: StateDict) -> StateDict {
    sd.tensors.sort_by(|a, b| a.name.cmp(&b.name));
    sd
}

#[test]
fn round_trip_is_exact_with_metadata() {
    let spec = DenseNetSpec::custom(4, vec![2, 3], 8, 2).unwrap();
    let sd = random_state_dict(&spec, seed("round_trip_is_exact_with_metadata").value);
    let meta = HashMap::from([
        ("arch".to_string(), serde_json::to_string(&spec).unwrap()),
        ("epoch".to_string(), "3".to_string()),
    ]);
    let dir = tmp("rt");
    let path = dir.join("model.safetensors");
    save_safetensors(&path, &sd, &meta).unwrap();
    // Overwriting works and leaves no temp file behind.
    save_safetensors(&path, &sd, &meta).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["model.safetensors"]);
    let ck = load_safetensors(&path).unwrap();
    assert_eq!(ck.metadata, meta);
    let back: DenseNetSpec = serde_json::from_str(&ck.metadata["arch"]).unwrap();
    assert_eq!(back, spec);
    check_state_dict(&ck.state_dict, &spec).unwrap();
    assert_eq!(sorted(ck.state_dict), sorted(sd.clone()));
    let c = ck_counter(&load_safetensors(&path).unwrap().state_dict);
    assert!(c.0.is_empty() && c.1.len() == 1);
    // No metadata is fine too.
    let bytes = to_safetensors_bytes(&sd, &HashMap::new()).unwrap();
    assert!(from_safetensors_bytes(&bytes).unwrap().metadata.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn ck_counter(sd: &StateDict) -> (Vec<usize>, Vec<i64>) {
    let t = sd.get("features.norm0.num_batches_tracked").unwrap();
    let TensorData::I64(v) = &t.data else {
        panic!()
    };
    (t.shape.clone(), v.clone())
}

#[test]
fn reads_a_file_from_another_writer() {
    // Written by scripts/make_pth_fixtures.py with its own small writer.
    let path = crate::common::fixtures().join("tiny_expected.safetensors");
    let sd = load_safetensors(&path).unwrap().state_dict;
    let t = sd.get("features.conv0.weight").unwrap();
    assert_eq!(t.shape, vec![8, 3, 7, 7]);
    let TensorData::F32(v) = &t.data else {
        panic!()
    };
    assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0));
}

#[test]
fn bad_files_are_refused_clearly() {
    let spec = DenseNetSpec::custom(4, vec![1], 8, 2).unwrap();
    let sd = random_state_dict(&spec, 9);
    let good = to_safetensors_bytes(&sd, &HashMap::new()).unwrap();
    assert_not_safetensors(b"\x89PNG\r\n\x1a\nnot weights at all");
    assert_not_safetensors(&[]);
    let mut rng = Rng::new(3);
    for _ in 0..20 {
        let cut = rng.below(good.len() as u64) as usize;
        assert_not_safetensors(&good[..cut]);
    }
    // A dtype mura does not use: the error names the tensor.
    let half: Vec<u8> = [1.0f32, 2.0]
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2], &half).unwrap();
    let bytes = safetensors::serialize([("features.norm0.weight", view)], None).unwrap();
    let e = from_safetensors_bytes(&bytes).unwrap_err();
    assert!(
        matches!(Error::find(&e), Some(Error::UnsupportedDtype { key, dtype })
            if key == "features.norm0.weight" && dtype == "F16"),
        "{e:#}"
    );
    // Shape and data disagreeing, or duplicate names, are refused on save.
    let refused = |sd: &StateDict| {
        let e = to_safetensors_bytes(sd, &HashMap::new()).unwrap_err();
        Error::find(&e)
            .expect("a weights error")
            .problems()
            .to_vec()
    };
    let mut bad = sd.clone();
    bad.tensors[0].shape = vec![1, 2];
    assert!(
        matches!(&refused(&bad)[..], [Problem::Length { key, .. }] if *key == sd.tensors[0].name)
    );
    let mut dup = sd.clone();
    dup.tensors.push(sd.tensors[0].clone());
    assert!(
        matches!(&refused(&dup)[..], [Problem::DuplicateKey { key }] if *key == sd.tensors[0].name)
    );
    // A missing file names its path.
    let e = format!(
        "{:#}",
        load_safetensors(std::path::Path::new("/nonexistent/w.safetensors")).unwrap_err()
    );
    assert!(e.contains("/nonexistent/w.safetensors"), "{e}");
}

/// A safetensors file of `header` (JSON) and `data`.
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend(header.as_bytes());
    f.extend(data);
    f
}

/// Asserts that `bytes` are refused as not a safetensors file.
fn assert_not_safetensors(bytes: &[u8]) {
    let e = from_safetensors_bytes(bytes).unwrap_err();
    assert!(
        matches!(Error::find(&e), Some(Error::NotSafetensors(_))),
        "{e:#}"
    );
}

#[test]
fn sizes_a_header_states_are_checked_against_the_file() {
    let four = 1f32.to_le_bytes();
    // A shape of 2^31 elements over 4 bytes, offsets past the end, overlapping tensors, a
    // header length of 2^64 - 1: refused before anything is allocated from them.
    for header in [
        r#"{"w":{"dtype":"F32","shape":[2147483648],"data_offsets":[0,4]}}"#,
        r#"{"w":{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4000000000]}}"#,
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
    ] {
        assert_not_safetensors(&raw_safetensors(header, &four));
    }
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend(b"{}");
    assert_not_safetensors(&huge);
    let ok = raw_safetensors(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &four,
    );
    assert_eq!(
        from_safetensors_bytes(&ok).unwrap().state_dict.tensors[0].data,
        TensorData::F32(vec![1.0])
    );
}

#[test]
fn only_regular_files_are_read() {
    let d = tmp("special");
    let link = d.join("zero.safetensors");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let e = format!("{:#}", load_safetensors(&link).unwrap_err());
    assert!(e.contains("is a device, not a regular file"), "{e}");
}
