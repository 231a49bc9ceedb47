//! Files on disk: bounded reads of regular files only, writes that commit in one step, and
//! [`failpoint`]s for crash tests.
//!
//! Every file mura reads as data goes through [`open_regular`]: a FIFO, a device (a link to
//! `/dev/zero`), a socket or a folder where a file belongs is refused before a byte is read, so
//! nothing hangs on a FIFO or reads until memory runs out; and [`read_regular`] never reads more
//! than the cap its caller states, whatever the file claims or grows to.
//!
//! Every file mura writes is either new ([`write_synced`]: a step of a larger commit;
//! [`write_new`]: a file that must not replace another) or replaced in one rename
//! ([`write_atomic`]), so a kill or a full disk leaves the old file or the
//! new one, never a part of either. A folder that one command rewrites is locked
//! ([`lock_folder`]) for as long as it does, so that a second one cannot take its files in
//! progress for leftovers.

pub mod failpoint;
pub mod mapped;
pub mod owned;

use anyhow::{bail, Context, Result};
use std::fs::{File, Metadata};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// The largest text file mura reads: a CSV, a store's index or manifest, a run's log (the
/// largest MURA needs is a full store's index, about 8 MB).
pub const MAX_TEXT_BYTES: u64 = 256 * MIB;

/// What kind of thing `meta` describes, for an error message.
fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` (links followed) for reading if it is a regular file; returns it and its length.
/// The type is checked before opening (a device is never opened) and again on the open file
/// (opened non-blocking, so a FIFO swapped in between cannot hang the open either).
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{} is {}, not a regular file; refusing to read it",
            path.display(),
            kind(&meta)
        );
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{} is {}, not a regular file; refusing to read it",
            path.display(),
            kind(&meta)
        );
    }
    Ok((file, meta.len()))
}

/// The whole of the regular file `path`, refused if it holds more than `cap` bytes (checked
/// before reading, and the read itself stops at `cap + 1` bytes).
pub fn read_regular(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    let too_big = || {
        anyhow::anyhow!(
            "{} is larger than the {} this file may have; refusing to read it",
            path.display(),
            show_size(cap)
        )
    };
    if len > cap {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len)?);
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > cap {
        return Err(too_big());
    }
    Ok(bytes)
}

/// [`read_regular`] of a UTF-8 text file.
pub fn read_regular_string(path: &Path, cap: u64) -> Result<String> {
    String::from_utf8(read_regular(path, cap)?)
        .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))
}

/// The names of the entries of the folder `dir` that are UTF-8 text (every name mura gives is;
/// one that is not is never mura's, and is left out).
pub fn entry_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot read {}", dir.display()))?;
        if let Ok(name) = e.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

/// Writes `data` to the new file `path` (an existing one is an error) and fsyncs it, then
/// passes the failpoint `step`: one step of a commit.
pub fn write_synced(path: &Path, data: &[u8], step: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .and_then(|_| failpoint::hit(step))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// An 8-bit RGB PNG of `rgb` ([h, w, 3]), for the file `path` (named in an error).
pub fn encode_png(path: &Path, rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    assert_eq!(
        rgb.len(),
        w as usize * h as usize * 3,
        "rgb buffer is [h, w, 3]"
    );
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    Ok(png)
}

/// Replaces `path` by an 8-bit RGB PNG of `rgb` ([h, w, 3]) in one rename ([`write_atomic`]).
pub fn write_png_atomic(path: &Path, rgb: &[u8], w: u32, h: u32) -> Result<()> {
    write_atomic(path, &encode_png(path, rgb, w, h)?)
}

/// Replaces `path` by a file holding `data` in one rename (see [`write_atomic_step`]).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_step(path, data, "atomic-write")
}

/// The temporary file [`write_atomic`] writes for `path`: `.NAME.tmp<pid>` beside it.
fn temporary(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let name = format!(".{}.tmp{}", name.to_string_lossy(), std::process::id());
    Ok(path.with_file_name(name))
}

/// Whether the folder entry `entry` is a temporary file of [`write_atomic`] for a file `name`
/// (left behind by a kill).
pub fn is_temporary(entry: &str, name: &str) -> bool {
    entry
        .strip_prefix('.')
        .and_then(|rest| rest.strip_prefix(name))
        .and_then(|rest| rest.strip_prefix(".tmp"))
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes from `dir` the temporary files that killed [`write_atomic`]s of the files `names`
/// left. Best effort: one that cannot be removed harms nothing and goes another time.
pub fn remove_temporaries(dir: &Path, names: &[&str]) {
    for entry in entry_names(dir).unwrap_or_default() {
        if names.iter().any(|n| is_temporary(&entry, n)) {
            let _ = std::fs::remove_file(dir.join(entry));
        }
    }
}

/// Replaces `path` by a file holding `data` in one rename, as the last step of a commit: the
/// data goes into a temporary file beside `path` (fsynced, then the failpoint `step`), which is
/// renamed over `path`; then the folder is fsynced. On an error the temporary file is removed
/// and `path` is as it was.
pub fn write_atomic_step(path: &Path, data: &[u8], step: &str) -> Result<()> {
    let tmp = temporary(path)?;
    let written = (|| {
        let mut f = File::create(&tmp)?; // truncating a leftover of a killed process with our pid
        f.write_all(data)?;
        f.sync_all()?;
        failpoint::hit(step)?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("cannot write {}", path.display()))?;
    sync_dir(path.parent());
    Ok(())
}

/// Writes the new file `path` holding `data` in one step, never replacing a file: the data goes
/// into a temporary file beside `path` (fsynced), which is linked as `path` (a link is refused
/// where `path` exists), then removed. On a file system without links, `path` is created
/// exclusively and written in place.
pub fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    let exists = || anyhow::anyhow!("{} already exists; refusing to replace it", path.display());
    let tmp = temporary(path)?;
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(exists()),
        // No links on this file system (FAT, say).
        Err(_) if path.symlink_metadata().is_ok() => return Err(exists()),
        Err(_) => write_synced(path, data, "atomic-write")?,
    }
    sync_dir(path.parent());
    Ok(())
}

/// fsyncs the folder `dir` (an empty path is the current folder) so that a rename inside it is
/// durable (best effort: not every platform lets a folder be opened).
pub fn sync_dir(dir: Option<&Path>) {
    let Some(dir) = dir else { return };
    let dir = match dir.as_os_str().is_empty() {
        true => Path::new("."),
        false => dir,
    };
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// An exclusive lock on the folder `dir` while the returned file is open: a second `command`
/// writing the same folder is refused instead of taking the first one's files for leftovers.
pub fn lock_folder(dir: &Path, command: &str) -> Result<File> {
    let f = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another '{command}' is writing {}; wait for it to finish",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", dir.display()))
        }
    }
}

/// `cap` for a message: whole MiB when it is at least one.
pub fn show_size(cap: u64) -> String {
    if cap >= MIB && cap.is_multiple_of(MIB) {
        format!("{} MiB", cap / MIB)
    } else {
        format!("{cap} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("mura-disk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_regular_files_within_the_cap() {
        let d = tmp("cap");
        let f = d.join("a.txt");
        std::fs::write(&f, b"hello").unwrap();
        assert_eq!(read_regular(&f, 5).unwrap(), b"hello");
        let e = format!("{:#}", read_regular(&f, 4).unwrap_err());
        assert!(e.contains("larger than the 4 bytes"), "{e}");
        let e = format!("{:#}", read_regular(&d, 4).unwrap_err());
        assert!(e.contains("is a folder"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_no_temporary() {
        let d = tmp("atomic");
        let f = d.join("a.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.json"]);
        let tmp = temporary(&f).unwrap();
        let tmp = tmp.file_name().unwrap().to_str().unwrap();
        assert!(is_temporary(tmp, "a.json"), "{tmp}");
        for other in [
            "a.json",
            ".a.json.tmp",
            ".a.json.tmpx",
            ".b.json.tmp1",
            "a.json.tmp1",
        ] {
            assert!(!is_temporary(other, "a.json"), "{other}");
        }
        // A file that exists is not written over by a step of a commit.
        let e = format!("{:#}", write_synced(&f, b"three", "test").unwrap_err());
        assert!(e.contains("cannot create"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_devices_behind_links() {
        let d = tmp("dev");
        let link = d.join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let e = format!("{:#}", read_regular(&link, 1 << 30).unwrap_err());
        assert!(e.contains("is a device, not a regular file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
