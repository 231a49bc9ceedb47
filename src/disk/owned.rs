//! Which folders are mura's, and how a folder of outputs is replaced in one step.
//!
//! The rule: a command deletes or replaces only what carries its own marker, or what it created
//! in this run. Every output folder mura makes holds a file [`MARKER`] saying which kind of folder
//! it is ([`Made`]); a folder is created with its marker already inside (made under a temporary
//! name, then renamed into place), so none is ever seen without one. A folder that holds anything
//! and no marker of the right kind is refused, whatever its entries are called. A folder written
//! by an earlier mura (no marker) is adopted only on proof that it is one (a store that the
//! store's reader opens, a run whose `config.json` parses), never on its entries' names.
//!
//! [`replace_folder`] writes a folder of outputs that belong together (a synthetic set, an
//! evaluation's files, a demo's work folder) as one commit: into a new folder beside, which then
//! takes the old one's place by one exchange of names (`renameat2(RENAME_EXCHANGE)`), so that a
//! kill or a full disk at any moment leaves the old set or the new one, never a mix or neither.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The file that marks a folder as mura's.
pub const MARKER: &str = ".mura";

/// The largest marker file read.
const MARKER_CAP: u64 = 256;

/// The kinds of folder mura makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Made {
    /// `mura synth --out`
    Synth,
    /// `mura prep --out`
    Store,
    /// `mura train --out`
    Run,
    /// `mura eval --out`
    Eval,
    /// `mura report`'s `RUN/report`
    Report,
    /// `mura demo --dir`
    Demo,
}

impl Made {
    const ALL: [Made; 6] = [
        Made::Synth,
        Made::Store,
        Made::Run,
        Made::Eval,
        Made::Report,
        Made::Demo,
    ];

    /// Its name in the marker and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Made::Synth => "synthetic dataset",
            Made::Store => "store",
            Made::Run => "run",
            Made::Eval => "evaluation",
            Made::Report => "report",
            Made::Demo => "demo",
        }
    }

    /// The marker's text.
    fn text(self) -> String {
        format!("made by mura: {}\n", self.name())
    }

    /// The marker file an earlier mura wrote for this kind, if it wrote one.
    fn earlier_marker(self) -> Option<&'static str> {
        match self {
            Made::Synth => Some(".mura-synth"),
            Made::Demo => Some(".mura-demo"),
            _ => None,
        }
    }
}

/// Which kind of mura folder `dir` is by its marker, if it carries one.
pub fn marked(dir: &Path) -> Option<Made> {
    if let Ok(text) = super::read_regular_string(&dir.join(MARKER), MARKER_CAP) {
        return Made::ALL.into_iter().find(|m| m.text() == text);
    }
    Made::ALL.into_iter().find(|m| {
        m.earlier_marker().is_some_and(|name| {
            dir.join(name)
                .symlink_metadata()
                .is_ok_and(|meta| meta.is_file())
        })
    })
}

/// What [`check`] found at an output path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing: the command creates it.
    Missing,
    /// An empty folder: the command may fill it.
    Empty,
    /// A folder of this kind that mura made.
    Ours,
}

/// Whether a command making a `kind` folder may write `dir`. `earlier` is the proof that an
/// unmarked folder is one an earlier mura wrote (`None`: no unmarked folder is adopted).
pub fn check(dir: &Path, kind: Made, earlier: Option<&dyn Fn(&Path) -> bool>) -> Result<Found> {
    if dir.symlink_metadata().is_err() {
        return Ok(Found::Missing);
    }
    if !dir.is_dir() {
        bail!(
            "{} exists and is not a folder; refusing to replace it",
            dir.display()
        );
    }
    match marked(dir) {
        Some(m) if m == kind => return Ok(Found::Ours),
        Some(m) => bail!(
            "{} is a mura {} folder, not a {} one; refusing to write into it",
            dir.display(),
            m.name(),
            kind.name()
        ),
        None => {}
    }
    let empty = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .next()
        .is_none();
    if empty {
        return Ok(Found::Empty);
    }
    if earlier.is_some_and(|proof| proof(dir)) {
        return Ok(Found::Ours);
    }
    bail!(
        "{} holds files that mura did not write (it has no {} marker); refusing to write into \
         it: pass a new or empty folder",
        dir.display(),
        kind.name()
    )
}

/// [`check`] of a folder that [`replace_folder`] will replace as a whole, which must not be the
/// current folder or one holding it.
pub fn check_replace(
    dir: &Path,
    kind: Made,
    earlier: Option<&dyn Fn(&Path) -> bool>,
) -> Result<Found> {
    split(dir, Replacing::Yes)?;
    check(dir, kind, earlier)
}

/// Makes `dir` a `kind` folder that this command may write: creates it (with its marker inside
/// from the first moment), marks an empty one, or checks that it is one already (see [`check`]).
/// Returns what was there.
pub fn claim(dir: &Path, kind: Made, earlier: Option<&dyn Fn(&Path) -> bool>) -> Result<Found> {
    let found = check(dir, kind, earlier)?;
    match found {
        Found::Missing => create_marked(dir, kind)?,
        Found::Empty => mark(dir, kind)?,
        Found::Ours if marked(dir) != Some(kind) => mark(dir, kind)?,
        Found::Ours => {}
    }
    Ok(found)
}

/// Writes the marker into `dir` (replacing an earlier one in one rename).
fn mark(dir: &Path, kind: Made) -> Result<()> {
    super::write_atomic_step(&dir.join(MARKER), kind.text().as_bytes(), "folder.marked")
}

/// Creates the folder `dir` with its marker: made under a temporary name beside it, renamed into
/// place.
fn create_marked(dir: &Path, kind: Made) -> Result<()> {
    let (parent, name) = split(dir, Replacing::No)?;
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = sibling(&parent, &name, "new");
    let _ = std::fs::remove_dir_all(&staging);
    let made = std::fs::create_dir(&staging)
        .map_err(anyhow::Error::from)
        .and_then(|()| mark(&staging, kind))
        .and_then(|()| {
            std::fs::rename(&staging, dir).map_err(|e| {
                anyhow::anyhow!(e).context(format!("{} appeared meanwhile", dir.display()))
            })
        });
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    made.with_context(|| format!("cannot create {}", dir.display()))?;
    super::sync_dir(Some(&parent));
    Ok(())
}

/// Whether a folder is to be replaced as a whole (renamed away, then removed).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replacing {
    Yes,
    No,
}

/// `dir` as (its parent folder, its name), resolved: the parent made absolute with its links
/// followed, `dir` itself followed where it is a link. A folder to be replaced may not be the
/// current folder or one holding it: that would pull the ground from under the shell (writing
/// into one, as `train --resume .` does, is fine).
fn split(dir: &Path, replacing: Replacing) -> Result<(PathBuf, std::ffi::OsString)> {
    let absolute =
        std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let resolved = match std::fs::canonicalize(&absolute) {
        Ok(p) => p,
        Err(_) => {
            let name = normal_name(&absolute, dir)?;
            let parent = absolute.parent().unwrap_or(Path::new("/"));
            let parent = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
            parent.join(name)
        }
    };
    if let Ok(cwd) = std::env::current_dir().and_then(std::fs::canonicalize) {
        if replacing == Replacing::Yes && cwd.starts_with(&resolved) {
            bail!(
                "{} is the current folder or holds it; pass a folder inside it instead (such as \
                 ./out)",
                dir.display()
            );
        }
    }
    let name = normal_name(&resolved, dir)?;
    let parent = resolved.parent().unwrap_or(Path::new("/")).to_path_buf();
    Ok((parent, name))
}

/// The last component of `path`, which must be a plain name (not `..` or a root).
fn normal_name(path: &Path, given: &Path) -> Result<std::ffi::OsString> {
    match path.components().next_back() {
        Some(std::path::Component::Normal(n)) => Ok(n.to_os_string()),
        _ => bail!("{} is not a folder mura can write", given.display()),
    }
}

/// A hidden name beside `name` for this process: `.NAME.<what>-<pid>`.
fn sibling(parent: &Path, name: &std::ffi::OsStr, what: &str) -> PathBuf {
    let mut s = std::ffi::OsString::from(".");
    s.push(name);
    s.push(format!(".{what}-{}", std::process::id()));
    parent.join(s)
}

/// Whether the process `pid` is alive.
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The siblings of `name` in `parent` that a killed [`replace_folder`] of a `kind` folder left:
/// `.NAME.new-<pid>` or `.NAME.old-<pid>` of a process that is gone, carrying the marker.
fn leftovers(parent: &Path, name: &std::ffi::OsStr, kind: Made) -> Vec<(PathBuf, bool)> {
    let Some(name) = name.to_str() else {
        return vec![];
    };
    let mut found = vec![];
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.strip_prefix(name))
        else {
            continue;
        };
        let (old, pid) = match (rest.strip_prefix(".old-"), rest.strip_prefix(".new-")) {
            (Some(pid), _) => (true, pid),
            (_, Some(pid)) => (false, pid),
            _ => continue,
        };
        let Some(pid) = pid.parse::<u32>().ok().filter(|p| p.to_string() == pid) else {
            continue;
        };
        let path = entry.path();
        if !alive(pid) && path.is_dir() && marked(&path) == Some(kind) {
            found.push((path, old));
        }
    }
    found
}

/// Replaces the `kind` folder `dir` (missing, empty, or one mura made, see [`check`]) by the
/// folder that `write` fills, in one step: `write` gets a new marked folder beside `dir`; when it
/// succeeds the two folders exchange names in one rename and the old one is removed. A kill or
/// an error at any moment leaves the old folder as it was, or the new one complete.
pub fn replace_folder<T>(
    dir: &Path,
    kind: Made,
    earlier: Option<&dyn Fn(&Path) -> bool>,
    write: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let (parent, name) = split(dir, Replacing::Yes)?;
    let target = parent.join(&name);
    for (path, old) in leftovers(&parent, &name, kind) {
        // An old folder moved aside by a killed fallback swap is the folder itself when
        // nothing took its place.
        if old && target.symlink_metadata().is_err() {
            let _ = std::fs::rename(&path, &target);
        } else {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    check(&target, kind, earlier)?;
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let staging = sibling(&parent, &name, "new");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let written = mark(&staging, kind)
        .and_then(|()| write(&staging))
        .and_then(|value| {
            super::failpoint::hit("folder.written")
                .with_context(|| format!("cannot write {}", dir.display()))?;
            sync_file_system(&staging);
            swap_in(&staging, &target, &sibling(&parent, &name, "old"))?;
            Ok(value)
        });
    // After a swap the staging name holds the old folder; on an error, the unfinished new one.
    let _ = std::fs::remove_dir_all(&staging);
    super::sync_dir(Some(&parent));
    written
}

/// Puts the folder `new` in `target`'s place: by one rename where `target` is missing, else by
/// exchanging the two names (the old folder then lies at `new`). Where the file system cannot
/// exchange, `target` is moved to `aside` first (a kill then leaves it there, and the next
/// [`replace_folder`] moves it back), then to `new`.
fn swap_in(new: &Path, target: &Path, aside: &Path) -> Result<()> {
    let cannot = || format!("cannot put the new {} in place", target.display());
    if target.symlink_metadata().is_err() {
        return std::fs::rename(new, target).with_context(cannot);
    }
    match exchange(new, target) {
        Ok(()) => return Ok(()),
        Err(e)
            if !matches!(
                e.raw_os_error(),
                Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
            ) =>
        {
            return Err(e).with_context(cannot)
        }
        Err(_) => {}
    }
    std::fs::rename(target, aside).with_context(cannot)?;
    super::failpoint::hit("folder.moved-aside").with_context(cannot)?;
    if let Err(e) = std::fs::rename(new, target) {
        let _ = std::fs::rename(aside, target);
        return Err(e).with_context(cannot);
    }
    std::fs::rename(aside, new).with_context(cannot)
}

/// Exchanges the names of `a` and `b` atomically.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| nul());
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid C strings; AT_FDCWD with absolute paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

#[cfg(target_os = "linux")]
fn nul() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path holds a NUL byte")
}

/// Flushes the file system holding `dir` to disk (best effort), so that the files written into
/// it are durable before the rename that commits them.
fn sync_file_system(dir: &Path) {
    #[cfg(target_os = "linux")]
    if let Ok(f) = std::fs::File::open(dir) {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor we own.
        unsafe { libc::syncfs(f.as_raw_fd()) };
    }
    #[cfg(not(target_os = "linux"))]
    super::sync_dir(Some(dir));
}

/// Undoes [`claim`] of a folder that a failed command leaves holding nothing but its marker:
/// removes the marker, and the folder too where the claim `found` it missing (created it).
pub fn unmark(dir: &Path, found: Found) {
    let only_marker = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .all(|e| e.file_name() == std::ffi::OsStr::new(MARKER))
        })
        .unwrap_or(false);
    if only_marker {
        let _ = std::fs::remove_file(dir.join(MARKER));
        if found == Found::Missing {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mura-owned-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_marked_or_empty_folders_are_written() {
        let d = tmp("check");
        let out = d.join("out");
        assert_eq!(check(&out, Made::Eval, None).unwrap(), Found::Missing);
        assert_eq!(claim(&out, Made::Eval, None).unwrap(), Found::Missing);
        assert_eq!(marked(&out), Some(Made::Eval));
        assert_eq!(check(&out, Made::Eval, None).unwrap(), Found::Ours);
        let e = format!("{:#}", check(&out, Made::Store, None).unwrap_err());
        assert!(
            e.contains("is a mura evaluation folder, not a store one"),
            "{e}"
        );
        let theirs = d.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::write(theirs.join("CURRENT"), "MANIFEST-000001\n").unwrap();
        let e = format!("{:#}", check(&theirs, Made::Store, None).unwrap_err());
        assert!(e.contains("mura did not write"), "{e}");
        assert!(check(&theirs, Made::Store, Some(&|_: &Path| true)).is_ok());
        // A forged marker of another text is no marker.
        std::fs::write(theirs.join(MARKER), "made by someone\n").unwrap();
        assert_eq!(marked(&theirs), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_replaced_folder_changes_as_a_whole() {
        let d = tmp("replace");
        let out = d.join("set");
        replace_folder(&out, Made::Synth, None, |dir| {
            Ok(std::fs::write(dir.join("a"), "1")?)
        })
        .unwrap();
        let r: Result<()> = replace_folder(&out, Made::Synth, None, |dir| {
            std::fs::write(dir.join("b"), "2")?;
            bail!("full disk")
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_to_string(out.join("a")).unwrap(), "1");
        assert!(!out.join("b").exists());
        replace_folder(&out, Made::Synth, None, |dir| {
            Ok(std::fs::write(dir.join("b"), "2")?)
        })
        .unwrap();
        assert!(!out.join("a").exists());
        assert_eq!(std::fs::read_to_string(out.join("b")).unwrap(), "2");
        let mut names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["set"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_current_folder_is_never_replaced() {
        let cwd = std::env::current_dir().unwrap();
        let e = format!("{:#}", split(&cwd, Replacing::Yes).unwrap_err());
        assert!(e.contains("current folder"), "{e}");
        assert!(split(Path::new("/"), Replacing::Yes).is_err());
        // Writing into the current folder (not replacing it) is fine.
        assert!(split(&cwd, Replacing::No).is_ok());
    }
}
