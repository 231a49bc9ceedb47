//! Failpoints: named steps of a multi-step commit to disk, where a test stops the process as
//! `kill -9` would, or makes the step fail as a full disk would, to check that every
//! interruption leaves the previous state or the new one, complete.
//!
//! `MURA_FAILPOINT=<name>:<n>[:kill|:enospc|:stop]`: the `n`-th time (counting from 1) the
//! process reaches a point named `<name>` or `<name>.<step>`, it kills itself with SIGKILL
//! (`kill`, the default), or that step fails with ENOSPC (`enospc`), or it stops itself with
//! SIGSTOP (`stop`) until a test that did something meanwhile (truncated a file, sent a signal)
//! sends SIGCONT, then waits 0.3 s for the signals sent while it was stopped to take effect.
//! Unset, a point costs one load.
//!
//! Points: `store.<step>`, the steps of `prep` writing and committing a store (see
//! `data::prep`); `checkpoint.<step>`, the steps of a training run saving its last checkpoint
//! (see `checkpoint::save_last`); `atomic-write`, any other file replaced in one rename (see
//! `disk::write_atomic`), when its new content is written but not yet renamed into place;
//! `folder.<step>`, a folder of outputs replaced as one (see `disk::owned`); `eval.<file>`, an
//! evaluation's files written; `store.opened`, a store opened and mapped; `train.step-done`,
//! each training step done (before Ctrl-C is looked at). A test
//! that counts up `n` from 1 until the command succeeds visits every step.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms a failpoint.
pub const ENV: &str = "MURA_FAILPOINT";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Action {
    Kill,
    NoSpace,
    Stop,
}

#[derive(Debug, PartialEq)]
struct Spec {
    name: String,
    n: u64,
    action: Action,
}

fn parse(s: &str) -> Option<Spec> {
    let mut parts = s.split(':');
    let name = parts.next().filter(|n| !n.is_empty())?.to_string();
    let n = parts.next()?.parse().ok().filter(|&n| n > 0)?;
    let action = match parts.next() {
        None | Some("kill") => Action::Kill,
        Some("enospc") => Action::NoSpace,
        Some("stop") => Action::Stop,
        Some(_) => return None,
    };
    parts.next().is_none().then_some(Spec { name, n, action })
}

fn armed() -> &'static Result<Option<Spec>, String> {
    static SPEC: OnceLock<Result<Option<Spec>, String>> = OnceLock::new();
    SPEC.get_or_init(|| match std::env::var(ENV) {
        Err(_) => Ok(None),
        Ok(s) => parse(&s)
            .map(Some)
            .ok_or_else(|| format!("{ENV}='{s}' is not <name>:<n>[:kill|:enospc|:stop]")),
    })
}

/// Reaching the step `point`: Ok unless a failpoint armed for it fires (see the module docs).
pub fn hit(point: &str) -> io::Result<()> {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let spec = match armed() {
        Ok(None) => return Ok(()),
        Ok(Some(spec)) => spec,
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidInput, e.clone())),
    };
    let named = point
        .strip_prefix(spec.name.as_str())
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
    if !named || HITS.fetch_add(1, Ordering::SeqCst) + 1 != spec.n {
        return Ok(());
    }
    match spec.action {
        Action::Kill => {
            crate::note!("failpoint {point}: killed");
            // SAFETY: plain syscalls on this process; SIGKILL does not return.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            std::process::abort()
        }
        Action::NoSpace => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        Action::Stop => {
            crate::note!("failpoint {point}: stopped");
            // SAFETY: a plain syscall on this process; it returns once continued.
            unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) };
            std::thread::sleep(std::time::Duration::from_millis(300));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_strictly() {
        let s = parse("store:3").unwrap();
        assert_eq!((s.name.as_str(), s.n, s.action), ("store", 3, Action::Kill));
        let s = parse("store.image-written:2:enospc").unwrap();
        assert_eq!(s.action, Action::NoSpace);
        assert_eq!(
            parse("train.step-done:1:stop").unwrap().action,
            Action::Stop
        );
        for bad in [
            "",
            "store",
            "store:0",
            "store:x",
            ":1",
            "store:1:later",
            "a:1:kill:x",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
