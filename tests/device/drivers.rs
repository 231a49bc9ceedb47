//! Device selection and `mura info`, with or without a CUDA driver on the machine; graph
//! capture and replay on the executor named by MURA_TEST_DEVICE (the emulator by default).

use crate::common::gpu::{seed, test_driver};
use anyhow::{bail, Result};
use half::bf16;
use mura::device::Device;
use mura::gpu::kernels::testing as k;
use mura::gpu::tracking::Tracking;
use mura::gpu::{self, blocks_for, cuda, ops, DeviceBuffer, Driver, Graph, Launch};
use mura::optim::Adam;
use mura::rng::Rng;
use std::process::Command;
use std::sync::Arc;

fn driver_present() -> bool {
    cuda::device_count().is_ok()
}

#[test]
fn cuda_without_a_driver_is_an_error_not_a_panic() {
    if driver_present() {
        assert!(gpu::open(Device::Cuda(0)).is_ok() || cuda::device_count().unwrap() == 0);
        let e = gpu::open(Device::Cuda(999))
            .err()
            .expect("device 999 does not exist");
        assert!(format!("{e:#}").contains("no CUDA device 999"), "{e:#}");
    } else {
        let e = gpu::open(Device::Cuda(0)).err().expect("no driver here");
        assert!(format!("{e:#}").contains("no CUDA driver found"), "{e:#}");
        assert_eq!(gpu::resolve(Device::Auto).unwrap(), Device::Cpu);
    }
}

#[test]
fn emu_and_cpu_resolve_to_themselves() {
    assert_eq!(gpu::resolve(Device::Emu).unwrap(), Device::Emu);
    assert_eq!(gpu::resolve(Device::Cpu).unwrap(), Device::Cpu);
    assert!(gpu::open(Device::Cpu).is_err());
    assert_eq!(gpu::open(Device::Emu).unwrap().name(), "emu");
}

#[test]
fn info_lists_devices_and_kernels() {
    // MURA_BIN: where scripts/gpu-check.sh put the binary, away from this build's target folder.
    let bin = std::env::var("MURA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mura").to_string());
    let out = Command::new(bin)
        .args(["info", "--kernels"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in ["cpu", "emu", "cuda", "built with"] {
        assert!(stdout.contains(want), "'{want}' missing from:\n{stdout}");
    }
    // With or without nvcc, every shipped kernel is named (a ptxas row, or the NVRTC list).
    for k in gpu::kernels::MODULES.iter().flat_map(|m| m.kernels) {
        assert!(stdout.contains(k), "kernel '{k}' missing from:\n{stdout}");
    }
    if !gpu::kernels::PTXAS_REPORT.is_empty() {
        // Built with nvcc: every kernel has its ptxas line for sm_80 and sm_90.
        for m in gpu::kernels::MODULES {
            for k in m.kernels {
                for arch in ["sm_80", "sm_90"] {
                    let row = stdout
                        .lines()
                        .find(|l| l.starts_with(&format!("{k} ")) && l.contains(arch));
                    assert!(row.is_some(), "no ptxas row for {k} on {arch}:\n{stdout}");
                }
            }
        }
    }
}

#[test]
fn ptxas_report_parses() {
    let report = "ptxas info    : Compiling entry function 'gemm_fwd_bf16' for 'sm_80'\n\
                  ptxas info    : Function properties for gemm_fwd_bf16\n    \
                  8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                  ptxas info    : Used 31 registers, used 1 barriers, 2304 bytes smem, 388 bytes cmem[0]\n";
    let e = &gpu::kernels::parse_ptxas(report)[0];
    assert_eq!(
        (e.kernel.as_str(), e.arch.as_str()),
        ("gemm_fwd_bf16", "sm_80")
    );
    assert_eq!(
        (
            e.registers,
            e.spill_stores,
            e.spill_loads,
            e.stack_bytes,
            e.smem_bytes
        ),
        (31, 4, 12, 8, 2304)
    );
}

/// The sources embedded for NVRTC compile, for sm_80 and sm_90, wherever libnvrtc and the CUDA
/// headers are found. With MURA_TEST_NVRTC=1 (CI, which installs NVRTC 13.0 and points
/// LD_LIBRARY_PATH and MURA_CUDA_INCLUDE at it) their absence is a failure; without it the test
/// says it did not run.
#[test]
fn nvrtc_compiles_embedded_sources() {
    if !nvrtc_here() {
        return;
    }
    for m in gpu::kernels::MODULES {
        for cc in [(8, 0), (9, 0)] {
            let ptx = gpu::nvrtc::compile(m, cc).unwrap();
            for k in m.kernels {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "{k} missing from NVRTC's PTX for {}",
                    m.file
                );
            }
        }
    }
}

/// Whether libnvrtc and the CUDA headers are here; without them, a failure under
/// MURA_TEST_NVRTC=1, else a line saying the NVRTC path was not exercised.
fn nvrtc_here() -> bool {
    let required = std::env::var("MURA_TEST_NVRTC").is_ok_and(|v| v == "1");
    // SAFETY: is_culib_present only tries to load the library, with no other effect.
    let why = if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        "libnvrtc is not loadable here".to_string()
    } else {
        match gpu::nvrtc::compile(relu_module(), (8, 0)) {
            Err(e) if format!("{e}").contains("needs the CUDA headers") => format!("{e}"),
            _ => return true,
        }
    };
    assert!(!required, "MURA_TEST_NVRTC=1 but {why}");
    eprintln!("{why}: NVRTC path NOT exercised (MURA_TEST_NVRTC=1 requires it)");
    false
}

/// The smallest module (test-only), quick to compile.
fn relu_module() -> &'static gpu::kernels::KernelModule {
    let modules = gpu::kernels::TEST_MODULES.iter();
    modules
        .clone()
        .find(|m| m.file == "testing/relu.cu")
        .unwrap()
}

/// NVRTC's output is cached on disk: compiled once, then read back; a damaged or torn entry is
/// compiled again and replaced, never used; another architecture is another entry; a cache
/// folder that is a file, a link or writable by others is not used, and costs only a compile.
#[test]
fn nvrtc_output_is_cached_on_disk() {
    use gpu::nvrtc::{cached, Origin};
    use std::os::unix::fs::PermissionsExt;
    if !nvrtc_here() {
        return;
    }
    let m = relu_module();
    let dir = crate::common::tmp("nvrtc-cache");
    let cache = dir.join("nvrtc");
    let (ptx, how) = cached(m, (9, 0), Some(&cache)).unwrap();
    assert!(ptx.contains(".entry relu_fwd_f32("), "{ptx}");
    assert_eq!(how, Origin::Compiled);
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the cache is its owner's alone");
    let entries = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let [entry] = entries().try_into().unwrap();
    assert_eq!(
        cached(m, (9, 0), Some(&cache)).unwrap(),
        (ptx.clone(), Origin::Disk)
    );
    // Damaged (one byte of the PTX), then torn: compiled again, and the entry replaced.
    let good = std::fs::read(&entry).unwrap();
    let mut bad = good.clone();
    let at = good.len() - ptx.len() / 2;
    bad[at] ^= 0x04;
    for broken in [bad, good[..good.len() - 10].to_vec(), Vec::new()] {
        std::fs::write(&entry, &broken).unwrap();
        assert_eq!(
            cached(m, (9, 0), Some(&cache)).unwrap(),
            (ptx.clone(), Origin::Compiled)
        );
        assert_eq!(
            std::fs::read(&entry).unwrap(),
            good,
            "the entry is rewritten whole"
        );
    }
    assert_eq!(cached(m, (8, 0), Some(&cache)).unwrap().1, Origin::Compiled);
    assert_eq!(entries().len(), 2, "one entry per architecture");
    // Folders that are not safe to use: written by others, a link, a file.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(
        cached(m, (9, 0), Some(&cache)).unwrap(),
        (ptx.clone(), Origin::Compiled)
    );
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&cache, &link).unwrap();
    assert_eq!(cached(m, (9, 0), Some(&link)).unwrap().1, Origin::Compiled);
    let file = dir.join("file");
    std::fs::write(&file, "not a folder").unwrap();
    assert_eq!(
        cached(m, (9, 0), Some(&file)).unwrap(),
        (ptx, Origin::Compiled)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

const NAN: u8 = 0xff; // every byte 0xff: NaN as f32 and as bf16

fn normal(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// The buffers of [`step`]: `x: [n]` f32 input, `p: [n]` f32 parameters; `y: [n]` f32,
/// `h: [n]` bf16, `m, v: [n]` f32 outputs, poisoned.
struct Bufs {
    x: DeviceBuffer<f32>,
    y: DeviceBuffer<f32>,
    h: DeviceBuffer<bf16>,
    p: DeviceBuffer<f32>,
    m: DeviceBuffer<f32>,
    v: DeviceBuffer<f32>,
}

impl Bufs {
    fn new(d: &Arc<dyn Driver>, x: &[f32], p: &[f32]) -> Bufs {
        let n = x.len();
        let b = Bufs {
            x: DeviceBuffer::from_slice(d, x).unwrap(),
            y: DeviceBuffer::alloc(d, n).unwrap(),
            h: DeviceBuffer::alloc(d, n).unwrap(),
            p: DeviceBuffer::from_slice(d, p).unwrap(),
            m: DeviceBuffer::alloc(d, n).unwrap(),
            v: DeviceBuffer::alloc(d, n).unwrap(),
        };
        b.y.fill_bytes(NAN).unwrap();
        b.h.fill_bytes(NAN).unwrap();
        b.m.fill_bytes(NAN).unwrap();
        b.v.fill_bytes(NAN).unwrap();
        b
    }

    /// Every output's bytes: y, h, p, m, v.
    fn outputs(&self) -> Vec<Vec<u8>> {
        let f = |b: &DeviceBuffer<f32>| bytemuck::cast_slice(&b.to_vec().unwrap()).to_vec();
        vec![
            f(&self.y),
            bytemuck::cast_slice(&self.h.to_vec().unwrap()).to_vec(),
            f(&self.p),
            f(&self.m),
            f(&self.v),
        ]
    }
}

/// relu_fwd_f32(y, x, n) with a short grid (the kernel loops): pointer and int parameters that
/// live only during this call.
fn relu(d: &dyn Driver, y: &DeviceBuffer<f32>, x: &DeviceBuffer<f32>) -> Result<()> {
    let n = x.len();
    let at = Launch::linear(blocks_for(n, 256).min(5), 256);
    // SAFETY: both buffers hold n f32.
    unsafe { k::relu_fwd_f32(d, at, y.ptr(), x.ptr(), n) }
}

/// A small training-step-like sequence: m = v = 0 (memsets); y = relu(x); h = bf16(y); one Adam
/// step of p with gradient y (pointer and float parameters).
fn step(d: &dyn Driver, b: &Bufs) -> Result<()> {
    let n = b.x.len();
    d.memset(b.m.ptr().addr(), 0, n * 4)?;
    d.memset(b.v.ptr().addr(), 0, n * 4)?;
    relu(d, &b.y, &b.x)?;
    ops::cast::to_bf16(d, b.y.slice(), b.h.slice())?;
    let mut adam = Adam::new(n, 0.01, 1e-4);
    adam.step = 1;
    let (p, g, m, v) = (b.p.slice(), b.y.slice(), b.m.slice(), b.v.slice());
    ops::adam::update(d, adam.current(), p, g, (m, v))
}

fn relu_bits(x: &[f32]) -> Vec<u8> {
    let y: Vec<f32> = x.iter().map(|&v| v.max(0.0)).collect();
    bytemuck::cast_slice(&y).to_vec()
}

#[test]
fn graph_replay_matches_direct_launches() {
    let d = test_driver();
    let seed = seed("graph_replay_matches_direct_launches");
    let mut rng = Rng::new(seed.value);
    let n = 10_007;
    let (x, p) = (normal(&mut rng, n), normal(&mut rng, n));
    let (a, b) = (Bufs::new(&d, &x, &p), Bufs::new(&d, &x, &p));
    let before = d.graph_count();
    let graph = Graph::capture(&d, || step(&*d, &a)).unwrap();
    assert_eq!(d.graph_count(), before + 1);

    // Nothing ran during the capture: outputs still poisoned, p untouched.
    let poisoned = a.outputs();
    for (i, out) in poisoned.iter().enumerate().filter(|&(i, _)| i != 2) {
        assert!(
            out.iter().all(|&byte| byte == NAN),
            "output {i} written during capture"
        );
    }
    assert_eq!(poisoned[2], bytemuck::cast_slice::<f32, u8>(&p));

    // Replay = the same work run directly, bit for bit; twice, as p moves on each time.
    let mut last_p = poisoned[2].clone();
    for round in 0..2 {
        graph.replay().unwrap();
        step(&*d, &b).unwrap();
        let out = a.outputs();
        assert!(
            out == b.outputs(),
            "replay {round} differs from direct launches"
        );
        assert_eq!(out[0], relu_bits(&x));
        assert_ne!(out[2], last_p, "replay {round} did not update p");
        last_p = out[2].clone();
    }

    // New input contents: the replay reads memory afresh (its pointers are what was captured).
    let x2 = normal(&mut rng, n);
    a.x.copy_from(&x2).unwrap();
    b.x.copy_from(&x2).unwrap();
    graph.replay().unwrap();
    step(&*d, &b).unwrap();
    let out = a.outputs();
    assert_eq!(out[0], relu_bits(&x2));
    assert!(
        out == b.outputs(),
        "replay on new input differs from direct launches"
    );

    // Dropping the handle frees the graph.
    let id = graph.id();
    drop(graph);
    assert_eq!(d.graph_count(), before);
    let e = d.replay(id).unwrap_err();
    assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
}

#[test]
fn capture_refuses_other_calls_and_driver_stays_usable() {
    let inner = test_driver();
    let tracking = Arc::new(Tracking::new(inner));
    let d: Arc<dyn Driver> = tracking.clone();
    let seed = seed("capture_refuses_other_calls");
    let mut rng = Rng::new(seed.value);
    let x = normal(&mut rng, 999);
    let xb = DeviceBuffer::from_slice(&d, &x).unwrap();
    let yb = DeviceBuffer::<f32>::alloc(&d, x.len()).unwrap();
    yb.fill_bytes(NAN).unwrap();
    let other = Graph::capture(&d, || yb.fill_bytes(NAN)).unwrap();
    let bytes_before = tracking.current_bytes();

    let graph = Graph::capture(&d, || {
        let refused: Vec<(&str, Result<()>)> = vec![
            ("htod", d.htod(xb.ptr().addr(), &[1, 2, 3, 4])),
            ("dtoh", d.dtoh(&mut [0; 4], xb.ptr().addr())),
            ("alloc", d.alloc(64).map(|_| ())),
            ("free", d.free(xb.ptr().addr())),
            ("synchronize", d.synchronize()),
            ("time", d.time(&mut || Ok(())).map(|_| ())),
            ("capture", d.capture(&mut || Ok(())).map(|_| ())),
            ("replay", other.replay()),
            ("free_graph", d.free_graph(other.id())),
        ];
        for (call, r) in refused {
            let e = r.expect_err(call);
            assert!(
                format!("{e:#}").contains("while capturing a graph"),
                "{call}: {e:#}"
            );
        }
        relu(&*d, &yb, &xb)
    })
    .unwrap();

    // Nothing was allocated, freed, copied or run; everything works again afterwards.
    assert_eq!(tracking.current_bytes(), bytes_before);
    assert_eq!(d.graph_count(), 2);
    let y = yb.to_vec().unwrap();
    assert!(y.iter().all(|v| v.is_nan()), "the relu ran during capture");
    assert_eq!(xb.to_vec().unwrap(), x, "x was changed during capture");
    let x2 = normal(&mut rng, x.len());
    xb.copy_from(&x2).unwrap();
    graph.replay().unwrap();
    d.synchronize().unwrap();
    assert_eq!(
        bytemuck::cast_slice::<f32, u8>(&yb.to_vec().unwrap()),
        relu_bits(&x2)
    );
    other.replay().unwrap();
    assert!(yb.to_vec().unwrap().iter().all(|v| v.is_nan()));
    let t = d.time(&mut || graph.replay()).unwrap();
    assert!(t >= 0.0);
    drop((graph, other));
    assert_eq!(d.graph_count(), 0);
}

#[test]
fn failed_capture_keeps_nothing() {
    let d = test_driver();
    let seed = seed("failed_capture_keeps_nothing");
    let mut rng = Rng::new(seed.value);
    let x = normal(&mut rng, 4099);
    let xb = DeviceBuffer::from_slice(&d, &x).unwrap();
    let yb = DeviceBuffer::<f32>::alloc(&d, x.len()).unwrap();
    yb.fill_bytes(NAN).unwrap();
    let e = Graph::capture(&d, || {
        yb.fill_bytes(0)?;
        relu(&*d, &yb, &xb)?;
        bail!("work failed on purpose")
    })
    .err()
    .expect("a failing work fails the capture");
    assert!(format!("{e:#}").contains("work failed on purpose"), "{e:#}");
    assert_eq!(d.graph_count(), 0);
    // Back in normal mode: the recorded work was dropped, direct work runs at once.
    assert!(yb.to_vec().unwrap().iter().all(|v| v.is_nan()));
    relu(&*d, &yb, &xb).unwrap();
    d.synchronize().unwrap();
    assert_eq!(
        bytemuck::cast_slice::<f32, u8>(&yb.to_vec().unwrap()),
        relu_bits(&x)
    );
    // And the next capture works.
    let graph = Graph::capture(&d, || yb.fill_bytes(NAN)).unwrap();
    graph.replay().unwrap();
    assert!(yb.to_vec().unwrap().iter().all(|v| v.is_nan()));
}

/// The recorder runs nothing: addresses are handed out once each and checked like the
/// emulator's, launches and memsets are recorded with their stage and parameters (pointers as
/// allocation and offset), a graph's nodes are recorded again at each replay, and what a capture
/// may not contain is refused.
#[test]
fn the_recorder_records_and_runs_nothing() {
    use mura::gpu::record::{Arg, Op, Recorder};
    use mura::model::schedule::{Dir, Stage};
    let rec = Arc::new(Recorder::new(7));
    let d: Arc<dyn Driver> = rec.clone();
    assert_eq!(d.sms(), 7);
    let a = DeviceBuffer::<f32>::zeroed(&d, 100).unwrap();
    let b = DeviceBuffer::<f32>::alloc(&d, 3).unwrap();
    drop(b);
    let c = DeviceBuffer::<f32>::alloc(&d, 3).unwrap();
    assert!(
        c.slice().ptr().addr() > a.slice().ptr().addr() + 400,
        "no address reused"
    );
    assert!(
        d.htod(a.slice().ptr().addr() + 396, &[0; 8]).is_err(),
        "past the end"
    );
    let mut back = [7u8; 8];
    d.dtoh(&mut back, a.slice().ptr().addr()).unwrap();
    assert_eq!(back, [0; 8], "nothing ran: zeros come back");
    rec.take();
    d.stage(Stage::Stem(Dir::Fwd));
    let g = Graph::capture(&d, || {
        assert!(d.alloc(4).is_err(), "no allocation while capturing");
        let (y, x) = (a.slice().range(4, 10)?, a.slice().range(0, 10)?);
        // SAFETY: x, y are live device buffers of 10 floats (nothing runs anyway).
        unsafe { k::relu_fwd_f32(&*d, Launch::linear(1, 32), y.ptr(), x.ptr(), 10usize) }
    })
    .unwrap();
    assert!(rec.take().is_empty(), "a capture records into its graph");
    d.stage(Stage::Adam);
    c.fill_bytes(0).unwrap();
    g.replay().unwrap();
    g.replay().unwrap();
    let events = rec.take();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].stage, Some(Stage::Adam));
    assert!(matches!(
        events[0].op,
        Op::Memset {
            dst: Arg::Addr {
                alloc: 2,
                offset: 0
            },
            byte: 0,
            bytes: 12
        }
    ));
    for e in &events[1..] {
        assert_eq!(e.stage, Some(Stage::Stem(Dir::Fwd)), "marked at capture");
        let Op::Launch(l) = &e.op else {
            panic!("{e:?}")
        };
        assert_eq!(
            (l.kernel, l.grid, l.block),
            ("relu_fwd_f32", [1, 1, 1], [32, 1, 1])
        );
        let at = |offset| Arg::Addr { alloc: 0, offset };
        let want = [at(16), at(0), Arg::Value(10)];
        assert_eq!(l.args, want);
    }
    // SAFETY: refused before anything could run.
    let e = unsafe { d.launch("no_such_kernel", Launch::linear(1, 1), &mut []) }.unwrap_err();
    assert!(format!("{e:#}").contains("no kernel named"), "{e:#}");
}
