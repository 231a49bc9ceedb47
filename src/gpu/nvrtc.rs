//! Kernels compiled at run time by NVRTC, for builds without nvcc: PTX for the device's compute
//! capability from each module's embedded source, once per process and cached on disk, so that
//! a second process (every test binary, every command) loads it instead of compiling again.
//!
//! The disk cache is a folder of its own ([`cache_dir`]), made readable and writable by its owner
//! only, and used only while it is a real folder (not a link) that no one else can write. One
//! file per module, architecture and compile: its key (NVRTC's version, the architecture, the
//! options and the whole source), then the PTX, with a CRC-32 of both. An entry is used only when
//! its key equals this compile's byte for byte and its sizes and checksum hold; anything else (a
//! torn or damaged file, another compiler's output) is compiled again and replaced. Entries are
//! written in one rename (`disk::write_atomic`), so a kill leaves the old entry or the new one.
//! A cache that cannot be read or written costs a compile, never an error.

use super::kernels::KernelModule;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The folder of the disk cache: `MURA_NVRTC_CACHE` (`off` for none), else
/// `$XDG_CACHE_HOME/mura/nvrtc`, else `$HOME/.cache/mura/nvrtc`; None without any of them.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("MURA_NVRTC_CACHE") {
        return (dir != "off").then(|| PathBuf::from(dir));
    }
    let base = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))?;
    Some(base.join("mura/nvrtc"))
}

/// PTX of module `m` for compute capability `cc`, compiled once per process (through the disk
/// cache of [`cache_dir`]), NUL-terminated for cuModuleLoadData.
pub fn ptx(m: &'static KernelModule, cc: (i32, i32)) -> Result<Arc<CString>> {
    type Memo = Mutex<HashMap<(&'static str, (i32, i32)), Arc<CString>>>;
    static MEMO: OnceLock<Memo> = OnceLock::new();
    // Held while compiling, so two threads never compile (or write) the same entry at once.
    let mut memo = MEMO.get_or_init(Memo::default).lock().unwrap();
    if let Some(ptx) = memo.get(&(m.file, cc)) {
        return Ok(ptx.clone());
    }
    let (ptx, _) = cached(m, cc, cache_dir().as_deref())?;
    let ptx = Arc::new(CString::new(ptx).context("NVRTC's PTX holds a NUL byte")?);
    memo.insert((m.file, cc), ptx.clone());
    Ok(ptx)
}

/// Where [`cached`]'s PTX came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A valid entry of the disk cache.
    Disk,
    /// NVRTC (no cache, no entry, or one that did not hold).
    Compiled,
}

/// PTX of module `m` for `cc`: from the disk cache in `dir` when it holds a valid entry for this
/// exact compile, else compiled (and stored there, best effort).
pub fn cached(m: &KernelModule, cc: (i32, i32), dir: Option<&Path>) -> Result<(String, Origin)> {
    let opts = options(cc);
    let key = key(m, &opts)?;
    let entry = dir
        .filter(|d| usable(d))
        .map(|d| d.join(entry_name(m, cc, &key)));
    if let Some(ptx) = entry.as_deref().and_then(|p| read_entry(p, &key)) {
        return Ok((ptx, Origin::Disk));
    }
    let ptx = compile(m, cc)?;
    if let Some(path) = &entry {
        let _ = crate::disk::write_atomic(path, &encode(&key, &ptx));
    }
    Ok((ptx, Origin::Compiled))
}

/// The most an entry may hold (the largest PTX is a few MiB).
const ENTRY_CAP: u64 = 256 << 20;
const MAGIC: &str = "mura-nvrtc-cache 1";

/// NVRTC's options for `cc`, besides the include paths.
fn options((major, minor): (i32, i32)) -> Vec<String> {
    vec![
        format!("--gpu-architecture=compute_{major}{minor}"),
        "-std=c++17".into(),
    ]
}

/// What an entry must have been compiled from: NVRTC's version, the options, the source.
fn key(m: &KernelModule, opts: &[String]) -> Result<Vec<u8>> {
    let (major, minor) = version()?;
    let head = format!("nvrtc {major}.{minor}\n{}\n{}\n", opts.join(" "), m.file);
    Ok([head.as_bytes(), m.source.as_bytes()].concat())
}

/// `<module>-<arch>-<hash of the key>.ptx`: a new compiler or source gets a new entry.
fn entry_name(m: &KernelModule, (major, minor): (i32, i32), key: &[u8]) -> String {
    let hash = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let stem = m.file.trim_end_matches(".cu").replace('/', "_");
    format!("{stem}-sm_{major}{minor}-{hash:016x}.ptx")
}

/// Creates `dir` (owner only) if needed; whether it is a folder of ours that no one else can
/// write, and not a link.
fn usable(dir: &Path) -> bool {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir);
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    std::fs::symlink_metadata(dir)
        .is_ok_and(|md| md.is_dir() && md.uid() == me && md.mode() & 0o022 == 0)
}

/// An entry: the magic line, the key's and the PTX's sizes and their CRC-32, one per line; then
/// the key and the PTX.
fn encode(key: &[u8], ptx: &str) -> Vec<u8> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(key);
    crc.update(ptx.as_bytes());
    let head = format!(
        "{MAGIC}\n{}\n{}\n{:08x}\n",
        key.len(),
        ptx.len(),
        crc.finalize()
    );
    [head.as_bytes(), key, ptx.as_bytes()].concat()
}

/// The PTX of the entry at `path` if it is one for `key` and intact.
fn read_entry(path: &Path, key: &[u8]) -> Option<String> {
    let data = crate::disk::read_regular(path, ENTRY_CAP).ok()?;
    decode(&data, key)
}

fn decode(data: &[u8], key: &[u8]) -> Option<String> {
    let mut lines = data.splitn(5, |&b| b == b'\n');
    let mut line = || std::str::from_utf8(lines.next()?).ok();
    if line()? != MAGIC {
        return None;
    }
    let key_len: usize = line()?.parse().ok()?;
    let ptx_len: usize = line()?.parse().ok()?;
    let crc = u32::from_str_radix(line()?, 16).ok()?;
    let body = lines.next()?;
    if key_len.checked_add(ptx_len)? != body.len() || &body[..key_len] != key {
        return None;
    }
    let ptx = &body[key_len..];
    let mut sum = crc32fast::Hasher::new();
    sum.update(key);
    sum.update(ptx);
    if sum.finalize() != crc || ptx.contains(&0) {
        return None;
    }
    String::from_utf8(ptx.to_vec()).ok()
}

/// NVRTC's (major, minor) version.
fn version() -> Result<(i32, i32)> {
    require_nvrtc("NVRTC")?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        bail!("nvrtcVersion failed: {r:?}");
    }
    Ok((major, minor))
}

fn require_nvrtc(what: &str) -> Result<()> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("{what} needs NVRTC (libnvrtc not found): install the CUDA toolkit, or build with NVCC set");
    }
    Ok(())
}

/// PTX for compute capability `cc` from the module's embedded source, by NVRTC. It needs the
/// CUDA headers (cuda_bf16.h): MURA_CUDA_INCLUDE, else CUDA_HOME/include, CUDA_PATH/include or
/// /usr/local/cuda/include, whichever exist.
pub fn compile(m: &KernelModule, cc: (i32, i32)) -> Result<String> {
    require_nvrtc(&format!("kernels/{}", m.file))?;
    let mut include_paths: Vec<String> = std::env::var("MURA_CUDA_INCLUDE").into_iter().collect();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = std::env::var(var) {
            include_paths.push(format!("{home}/include"));
        }
    }
    include_paths.push("/usr/local/cuda/include".into());
    include_paths.retain(|p| Path::new(p).join("cuda_bf16.h").is_file());
    if include_paths.is_empty() {
        bail!("NVRTC needs the CUDA headers (cuda_bf16.h): set MURA_CUDA_INCLUDE or CUDA_HOME");
    }
    let opts = cudarc::nvrtc::CompileOptions {
        include_paths,
        options: options(cc),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(m.source, opts)
        .map_err(|e| anyhow!("NVRTC failed on kernels/{}: {e}", m.file))?;
    Ok(ptx.to_src())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_hold_only_for_their_key_and_intact() {
        let key = b"nvrtc 13.0\n--gpu-architecture=compute_90 -std=c++17\nx.cu\nsource".to_vec();
        let ptx = ".version 9.0\n.target sm_90\n";
        let e = encode(&key, ptx);
        assert_eq!(decode(&e, &key).as_deref(), Some(ptx));
        let mut other = key.clone();
        *other.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&e, &other), None, "another source");
        for cut in [0, 10, e.len() - 1] {
            assert_eq!(decode(&e[..cut], &key), None, "torn at {cut}");
        }
        for at in (0..e.len()).step_by(7) {
            let mut bad = e.clone();
            bad[at] ^= 1;
            assert_eq!(decode(&bad, &key), None, "byte {at} flipped");
        }
        let mut long = e.clone();
        long.push(b'x');
        assert_eq!(decode(&long, &key), None, "trailing bytes");
    }
}
