//! Files on disk: bounded reads of regular files only, and [`failpoint`]s for crash tests.
//!
//! Every file mura reads as data goes through [`open_regular`]: a FIFO, a device (a link to
//! `/dev/zero`), a socket or a folder where a file belongs is refused before a byte is read, so
//! nothing hangs on a FIFO or reads until memory runs out; and [`read_regular`] never reads more
//! than the cap its caller states, whatever the file claims or grows to.

pub mod failpoint;

use anyhow::{bail, Context, Result};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

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
    let mut bytes = Vec::with_capacity(len as usize);
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

/// `cap` for a message: whole MiB when it is at least one.
fn show_size(cap: u64) -> String {
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
    fn refuses_devices_behind_links() {
        let d = tmp("dev");
        let link = d.join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let e = format!("{:#}", read_regular(&link, 1 << 30).unwrap_err());
        assert!(e.contains("is a device, not a regular file"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
