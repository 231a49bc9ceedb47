//! Standard output for the commands. A closed pipe (`mura inspect STORE | head -1`) ends the
//! command quietly with success, as `head` expects, instead of a panic: [`line`] returns
//! [`Closed`], which `main` treats as a finished command.

use std::io::{ErrorKind, Write};

/// Standard output was closed by its reader.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct Closed;

/// One line to standard output (what [`out!`] expands to).
pub fn line(args: std::fmt::Arguments) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
    {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(Closed.into()),
        r => Ok(r?),
    }
}

/// Whether `e` is (or was caused by) a closed standard output.
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Closed>())
}

/// `println!` that returns [`Closed`] (with `?`) when standard output is a closed pipe.
#[macro_export]
macro_rules! out {
    () => {
        $crate::cli::out::line(format_args!(""))?
    };
    ($($arg:tt)*) => {
        $crate::cli::out::line(format_args!($($arg)*))?
    };
}
