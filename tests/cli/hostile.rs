//! Hostile files, each met through the `mura` command a user would run: one `error:` line and
//! exit code 1, within 4 GiB of address space and a few seconds (no panic, abort, hang or
//! unbounded allocation).

use crate::common::{mura_bounded, one_error_line, run_ok, s, tmp, Bounded, TINY};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const MEM: u64 = 4 << 30;
const SECS: u64 = 30;

/// A small prepped store shared by the tests.
fn store() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| crate::common::prepped(&tmp("data"), 8, 3).1)
}

/// Runs mura bounded and returns its one error line.
fn fails(args: &[&str]) -> String {
    let run: Bounded = mura_bounded(args, &[], MEM, SECS);
    let line = one_error_line(&run, &format!("mura {args:?}"));
    println!("mura {} ({:.2} s): {line}", args[0], run.seconds);
    line
}

// --- .pth files ----------------------------------------------------------------------------

/// Hand-assembled protocol-2 pickles, as torch.save writes them.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    fn op(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(self, s: &str) -> Self {
        let len = (s.len() as u32).to_le_bytes();
        self.op(b"X").op(&len).op(s.as_bytes())
    }
    fn int(self, i: i128) -> Self {
        self.op(&[0x8a, 16]).op(&i.to_le_bytes())
    }
    fn ints(self, xs: &[i128]) -> Self {
        xs.iter().fold(self.op(b"("), |p, &x| p.int(x)).op(b"t")
    }
    fn global(self, module: &str, name: &str) -> Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn done(self) -> Vec<u8> {
        self.op(b".").0
    }
}

/// The pickle of `{"w": tensor}`, the tensor a view (`size`, `stride`) of the f32 storage "0"
/// of `numel` elements.
fn tensor_pickle(numel: i128, size: &[i128], stride: &[i128]) -> Vec<u8> {
    Pickle::new()
        .op(b"}(")
        .str("w")
        .global("torch._utils", "_rebuild_tensor_v2")
        .op(b"(")
        .op(b"(")
        .str("storage")
        .global("torch", "FloatStorage")
        .str("0")
        .str("cpu")
        .int(numel)
        .op(b"tQ")
        .int(0)
        .ints(size)
        .ints(stride)
        .op(b"\x89")
        .global("collections", "OrderedDict")
        .op(b")RtR")
        .op(b"u")
        .done()
}

/// A legacy `.pth`: header pickles, `state_dict`, the key list, then `storages` (key, numel, bytes).
fn legacy(state_dict: &[u8], storages: &[(&str, u64, &[u8])]) -> Vec<u8> {
    let mut f = Pickle::new().int(0x1950a86a20f9469cfc6c).done();
    f.extend(Pickle::new().int(1001).done());
    f.extend(Pickle::new().op(b"}").done());
    f.extend(state_dict);
    let keys = storages
        .iter()
        .fold(Pickle::new().op(b"]("), |p, (k, _, _)| p.str(k));
    f.extend(keys.op(b"e").done());
    for (_, numel, bytes) in storages {
        f.extend(numel.to_le_bytes());
        f.extend(*bytes);
    }
    f
}

/// A zip `.pth` of `(name, bytes, deflated)` members under `archive/`.
fn zip_pth(members: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes, deflated) in members {
        let method = match deflated {
            true => zip::CompressionMethod::Deflated,
            false => zip::CompressionMethod::Stored,
        };
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(method)
            .large_file(bytes.len() > u32::MAX as usize);
        z.start_file(format!("archive/{name}"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap().into_inner()
}

/// `train --init imagenet:<bytes as a .pth>` on the shared store: its error line.
fn import(name: &str, bytes: &[u8]) -> String {
    let d = tmp(name);
    let f = d.join(format!("{name}.pth"));
    std::fs::write(&f, bytes).unwrap();
    let init = format!("imagenet:{}", s(&f));
    let run = d.join("run");
    let mut args = vec!["train", "--store", s(store()), "--out", s(&run)];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&["--init", &init, "--quiet"]);
    fails(&args)
}

#[test]
fn memo_bomb_pth_is_shared_not_copied() {
    // 200 bytes whose value doubles itself 40 times through the memo (top = (top, memo[0]),
    // memoised as memo[0]): 2^40 leaves if copied.
    let mut p = Pickle::new().op(b"}(").str("w").op(b"]q\x00");
    for _ in 0..40 {
        p = p.op(b"h\x00\x86q\x00");
    }
    let e = import("memo", &legacy(&p.op(b"u").done(), &[]));
    assert!(
        e.contains("state dict entry 'w' is not a tensor (a tuple)"),
        "{e}"
    );
}

#[test]
fn deeply_nested_zip_pth_is_refused() {
    // 100,000 lists, each appended to the one below: a few hundred bytes compressed.
    let mut pkl = vec![0x80, 2];
    pkl.extend(std::iter::repeat_n(b']', 100_000));
    pkl.extend(std::iter::repeat_n(b'a', 99_999));
    pkl.push(b'.');
    let f = zip_pth(&[("data.pkl", &pkl, true)]);
    assert!(f.len() < 2000, "{} bytes", f.len());
    let e = import("nested", &f);
    assert!(e.contains("nests containers deeper than 100 levels"), "{e}");
}

#[test]
fn stride_zero_view_of_one_element_is_refused() {
    let sd = tensor_pickle(1, &[1 << 31], &[0]);
    let e = import("stride0", &legacy(&sd, &[("0", 1, &1f32.to_le_bytes())]));
    assert!(
        e.contains("size [2147483648] has 2147483648 elements but its storage holds 1"),
        "{e}"
    );
}

#[test]
fn deflate_bomb_in_a_zip_pth_is_refused_by_size() {
    // A storage that should hold 4 f32 (16 bytes) inflates to 64 MiB.
    let sd = tensor_pickle(4, &[4], &[1]);
    let zeros = vec![0u8; 64 << 20];
    let honest = zip_pth(&[("data.pkl", &sd, false), ("data/0", &zeros, true)]);
    assert!(honest.len() < 200_000, "{} bytes", honest.len());
    let e = import("bomb", &honest);
    assert!(
        e.contains("'archive/data/0' in the zip holds more than the 16 bytes expected"),
        "{e}"
    );
    // The same member declaring 16 bytes: inflated no further than 17.
    let mut lying = honest.clone();
    let size = (64u32 << 20).to_le_bytes();
    let at: Vec<usize> = (0..lying.len() - 4)
        .filter(|&i| lying[i..i + 4] == size)
        .collect();
    assert_eq!(at.len(), 2, "local and central sizes");
    for i in at {
        lying[i..i + 4].copy_from_slice(&16u32.to_le_bytes());
    }
    let e = import("bomb-lying", &lying);
    assert!(
        e.contains("'archive/data/0' in the zip holds more than the 16 bytes expected"),
        "{e}"
    );
}

// --- stores --------------------------------------------------------------------------------

/// A copy of the shared store whose generation's `file` is edited by `edit`.
fn store_with(name: &str, file: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let d = tmp(name).join("store");
    let gen = std::fs::read_to_string(store().join("CURRENT")).unwrap();
    let gen = gen.trim();
    std::fs::create_dir_all(d.join(gen)).unwrap();
    std::fs::copy(store().join("CURRENT"), d.join("CURRENT")).unwrap();
    for f in ["images.bin", "index.json", "manifest.json"] {
        std::fs::copy(store().join(gen).join(f), d.join(gen).join(f)).unwrap();
    }
    edit(&d.join(gen).join(file));
    d
}

/// Edits a JSON file in place.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// `inspect` and `train` on the store must both fail with the same line.
fn store_refused(store: &Path) -> String {
    let e = fails(&["inspect", s(store)]);
    let run = store.parent().unwrap().join("run");
    let mut args = vec!["train", "--store", s(store), "--out", s(&run), "--quiet"];
    args.extend_from_slice(TINY);
    assert_eq!(fails(&args), e);
    e
}

#[test]
fn wrapped_index_range_is_refused() {
    let d = store_with("wrap", "index.json", |p| {
        edit_json(p, |v| {
            let st = &mut v["studies"][1];
            st["first_image"] = serde_json::json!(u64::MAX - 1);
            st["n_views"] = serde_json::json!(3);
        })
    });
    let e = store_refused(&d);
    assert!(
        e.contains("index.json: study")
            && e.contains("has views 18446744073709551614..+3, outside the"),
        "{e}"
    );
}

#[test]
fn label_seven_is_refused() {
    let d = store_with("label7", "index.json", |p| {
        edit_json(p, |v| v["studies"][0]["label"] = serde_json::json!(7))
    });
    let e = store_refused(&d);
    assert!(e.contains("has label 7 (a label is 0, 1 or none)"), "{e}");
}

#[test]
fn negative_loss_weight_is_refused() {
    let d = store_with("weights", "manifest.json", |p| {
        edit_json(p, |v| {
            let (t, w) = v["weights"]
                .as_object_mut()
                .unwrap()
                .iter_mut()
                .next()
                .unwrap();
            assert!(t.starts_with("XR_"));
            w["w0"] = serde_json::json!(-0.25);
        })
    });
    let e = store_refused(&d);
    assert!(
        e.contains("loss weight w0 of XR_") && e.contains("is -0.25, outside [0, 1]"),
        "{e}"
    );
}

#[test]
fn fifo_index_does_not_hang() {
    let d = store_with("fifo", "index.json", |p| {
        std::fs::remove_file(p).unwrap();
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a plain syscall with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    });
    let e = store_refused(&d);
    assert!(
        e.contains("index.json is a FIFO, not a regular file"),
        "{e}"
    );
}

#[test]
fn link_to_dev_zero_is_not_read() {
    for file in ["index.json", "images.bin"] {
        let d = store_with(&format!("zero-{file}"), file, |p| {
            std::fs::remove_file(p).unwrap();
            std::os::unix::fs::symlink("/dev/zero", p).unwrap();
        });
        let e = store_refused(&d);
        assert!(
            e.contains(&format!("{file} is a device, not a regular file")),
            "{e}"
        );
    }
}

// --- plots ---------------------------------------------------------------------------------

#[test]
fn metric_of_1e308_is_refused_not_plotted_for_ever() {
    let d = tmp("plot");
    let rec = |e: u32, loss: f64| {
        format!(r#"{{"epoch":{e},"train_loss":{loss:e},"val_loss":0.5,"lr":0.0001,"kappa":0.5}}"#)
    };
    std::fs::write(
        d.join("metrics.jsonl"),
        format!("{}\n{}\n", rec(1, 1e308), rec(2, -1e308)),
    )
    .unwrap();
    let e = fails(&["report", s(&d)]);
    assert!(
        e.contains("cannot plot the losses: they range from -1e308 to 1e308"),
        "{e}"
    );
}

// --- a run's files -------------------------------------------------------------------------

/// A run of the tiny net, one epoch of one batch, trained once and shared.
fn trained_run() -> &'static PathBuf {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        let run = tmp("run").join("run");
        let mut args = vec!["train", "--store", s(store()), "--out", s(&run), "--quiet"];
        args.extend_from_slice(TINY);
        args.extend(["--image-size", "32", "--epochs", "1", "--max-batches", "1"]);
        run_ok(&args);
        run
    })
}

/// A copy of the shared run whose `file` is edited by `edit`.
fn run_with(name: &str, file: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let d = tmp(name).join("run");
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(trained_run()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    edit(&d.join(file));
    d
}

/// `train --resume` of `run` fails with one line, and removes nothing from the run.
fn resume_refused(run: &Path) -> String {
    let names = |d: &Path| -> Vec<_> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = names(run);
    let e = fails(&["train", "--resume", s(run), "--epochs", "2", "--quiet"]);
    assert_eq!(names(run), before, "{e}");
    e
}

/// Replaces the file `p` by a FIFO.
fn fifo(p: &Path) {
    std::fs::remove_file(p).unwrap();
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a plain syscall with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

/// Replaces the file `p` by a link to `/dev/zero`.
fn zero(p: &Path) {
    std::fs::remove_file(p).unwrap();
    std::os::unix::fs::symlink("/dev/zero", p).unwrap();
}

const OPTIM: &str = "last.optim-1.safetensors";

#[test]
fn special_or_huge_run_files_are_not_read() {
    let e = resume_refused(&run_with("cfg-fifo", "config.json", fifo));
    assert!(
        e.contains("config.json is a FIFO, not a regular file"),
        "{e}"
    );
    let e = resume_refused(&run_with("cfg-zero", "config.json", zero));
    assert!(
        e.contains("config.json is a device, not a regular file"),
        "{e}"
    );
    let e = resume_refused(&run_with("cfg-big", "config.json", |p| {
        let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
        f.write_all(&vec![b' '; 2 << 20]).unwrap();
    }));
    assert!(e.contains("config.json is larger than the 1 MiB"), "{e}");
    let e = resume_refused(&run_with("optim-zero", OPTIM, zero));
    assert!(
        e.contains(&format!("{OPTIM} is a device, not a regular file")),
        "{e}"
    );
    // Moments of far more floats than the model has parameters: refused before reading.
    let e = resume_refused(&run_with("optim-big", OPTIM, |p| {
        edit_optim(p, |sd, _| {
            for t in &mut sd.tensors {
                t.shape = vec![1 << 20];
                t.data = mura::weights::TensorData::F32(vec![0.0; 1 << 20]);
            }
        })
    }));
    assert!(e.contains(&format!("{OPTIM} is larger than the")), "{e}");
}

/// Rewrites the safetensors file `p` through `edit` of its tensors and metadata.
fn edit_optim(
    p: &Path,
    edit: impl FnOnce(&mut mura::weights::StateDict, &mut std::collections::HashMap<String, String>),
) {
    let mut ck = mura::weights::load_safetensors(p).unwrap();
    edit(&mut ck.state_dict, &mut ck.metadata);
    mura::weights::save_safetensors(p, &ck.state_dict, &ck.metadata).unwrap();
}

/// Edits the run state in the optimiser file `p`.
fn edit_state(p: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    edit_optim(p, |_, meta| {
        let mut v: serde_json::Value = serde_json::from_str(&meta["state"]).unwrap();
        edit(&mut v);
        meta.insert("state".into(), v.to_string());
    });
}

#[test]
fn run_files_that_disagree_with_the_model_are_refused() {
    let e = resume_refused(&run_with("short-moment", OPTIM, |p| {
        edit_optim(p, |sd, _| {
            let t = &mut sd.tensors[0];
            if let mura::weights::TensorData::F32(v) = &mut t.data {
                v.pop();
                t.shape = vec![v.len()];
            }
        })
    }));
    assert!(
        e.contains("is missing or not") && e.contains("floats (the model's parameters)"),
        "{e}"
    );
    // The model names its optimiser file: a path elsewhere is not followed.
    let e = resume_refused(&run_with("optim-path", "last.safetensors", |p| {
        edit_optim(p, |_, meta| {
            meta.insert("optimizer".into(), "../../../etc/passwd".into());
        })
    }));
    assert!(
        e.contains(r#"its metadata names "../../../etc/passwd", not an optimiser file"#),
        "{e}"
    );
    for (name, field, value) in [
        ("lr", "lr", serde_json::json!(-1.0)),
        ("step", "adam_step", serde_json::json!(1u64 << 40)),
        (
            "factor",
            "scheduler",
            serde_json::json!({"factor": 10.0, "patience": 1, "threshold": 1e-4, "cooldown": 0, "min_lr": 0.0, "eps": 1e-8, "best": null, "num_bad_epochs": 0, "cooldown_counter": 0}),
        ),
    ] {
        let e = resume_refused(&run_with(&format!("state-{name}"), OPTIM, |p| {
            edit_state(p, |v| v[field] = value)
        }));
        assert!(e.contains("damaged run state"), "{name}: {e}");
    }
    // Without its last model a run that has trained is not started again over its best model.
    let e = resume_refused(&run_with("no-last", "last.safetensors", |p| {
        std::fs::remove_file(p).unwrap()
    }));
    assert!(
        e.contains("has trained 1 epoch(s) (see metrics.jsonl) but has no last.safetensors"),
        "{e}"
    );
    let e = resume_refused(&run_with("state-batch", OPTIM, |p| {
        edit_state(p, |v| {
            v["batches_done"] = serde_json::json!(1_000_000_000_000u64)
        })
    }));
    assert!(
        e.contains("the last checkpoint is at batch 1000000000000 of an epoch of 1"),
        "{e}"
    );
}

// --- PNGs ----------------------------------------------------------------------------------

/// Bits packed as deflate writes them (least significant first).
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, v: u64, len: u32) {
        self.acc |= v << self.n;
        self.n += len;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// A Huffman code, which deflate packs most significant bit first.
    fn code(&mut self, c: u64, len: u32) {
        self.put(c.reverse_bits() >> (64 - len), len);
    }
}

/// A zlib stream inflating to `n` zero bytes: one fixed-Huffman block, a literal 0, then copies
/// of 258 bytes at distance 1 (13 bits each), so about n / 160 bytes.
fn zlib_zeros(n: usize) -> Vec<u8> {
    let mut w = Bits::default();
    w.out.extend([0x78, 0x01]);
    w.put(0b011, 3); // final block, fixed codes
    w.code(0x30, 8); // literal 0
    let mut left = n - 1;
    while left >= 258 {
        w.code(0xc5, 8); // length 258
        w.code(0, 5); // distance 1
        left -= 258;
    }
    for _ in 0..left {
        w.code(0x30, 8);
    }
    w.code(0, 7); // end of block
    w.put(0, 7);
    let adler = ((n % 65521) as u32) << 16 | 1;
    w.out.extend(adler.to_be_bytes());
    w.out
}

/// An 8-bit gray PNG of `side`² black pixels, compressed as a decompression bomb.
fn black_png(side: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend(kind);
        c.extend(data);
        c.extend(crc32fast::hash(&[kind, data].concat()).to_be_bytes());
        c
    };
    let mut ihdr = side.to_be_bytes().to_vec();
    ihdr.extend(side.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(
        b"IDAT",
        &zlib_zeros(side as usize * (side as usize + 1)),
    ));
    png.extend(chunk(b"IEND", b""));
    png
}

#[test]
fn png_of_16000_squared_is_refused_before_inflating() {
    // The bomb is well formed: a small one decodes.
    let small = mura::data::image::decode_gray_bytes(&black_png(300)).unwrap();
    assert_eq!((small.width, small.height), (300, 300));
    assert!(small.data.iter().all(|&v| v == 0.0));

    let src = tmp("png").join("src");
    run_ok(&["synth", "--out", s(&src), "--studies", "3", "--seed", "4"]);
    let big = black_png(16000);
    assert!(big.len() < 2 << 20, "{} bytes inflate to 256 MB", big.len());
    let view = std::fs::read_dir(src.join("MURA-v1.1/train"))
        .unwrap()
        .flat_map(|t| std::fs::read_dir(t.unwrap().path()).unwrap())
        .flat_map(|p| std::fs::read_dir(p.unwrap().path()).unwrap())
        .flat_map(|s| std::fs::read_dir(s.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .find(|f| f.extension().is_some_and(|e| e == "png"))
        .unwrap();
    std::fs::write(&view, &big).unwrap();
    let out = src.parent().unwrap().join("store");
    let args = [
        "prep",
        "--mura-root",
        s(&src),
        "--out",
        s(&out),
        "--size",
        "16",
        "--strict",
    ];
    let e = fails(&args);
    assert!(
        e.contains("PNG is too large to decode") && e.contains("at most 8192x8192 pixels"),
        "{e}"
    );
}
