//! The one output layer of the commands: results on standard output ([`out!`], [`block`]),
//! notes on standard error ([`note!`]), the final error line ([`error_line`]).
//!
//! Two rules hold for every line mura prints:
//! - **A stream never stops or crashes a command.** A closed or failing standard output or error
//!   (`mura eval ... | head -c0`, `mura train ... 2>&1 >/dev/null | grep -m1 epoch`) drops the
//!   lines written to it from then on; the command still does all its work and writes all its
//!   files, and its exit status says how that went. (The library code prints nothing itself:
//!   `clippy::print_stdout` and `print_stderr` are denied outside this module.)
//! - **A line is one line.** Whatever a line carries from a file, a name or a path, its control
//!   characters (a newline that would start a forged `error:` line, a carriage return, an escape
//!   sequence) and the Unicode controls that reorder text are printed escaped (`\n`, `\u{1b}`).
//!
//! A command stopped by Ctrl-C returns [`Interrupted`], which `main` reports with exit status 130,
//! as a shell reports a command killed by SIGINT, so that `mura train ... && mura eval ...` stops.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;

/// A command stopped by Ctrl-C after saving what it had: its message says what was kept.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);

/// The exit status of a command stopped by Ctrl-C (128 + SIGINT).
pub const INTERRUPTED_STATUS: i32 = 130;

/// `text` with its control characters escaped, so that it prints as one line.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\t')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return text.into();
    }
    let mut s = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            c if unsafe_char(c) => s.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => s.push(c),
        }
    }
    s.into()
}

/// Writes `text` escaped and a newline to `stream`, ignoring a stream that is closed or fails.
fn write_line(mut stream: impl Write, text: &str) {
    let _ = stream
        .write_all(escape(text).as_bytes())
        .and_then(|()| stream.write_all(b"\n"))
        .and_then(|()| stream.flush());
}

/// One line to standard output (what [`out!`] expands to).
pub fn line(args: std::fmt::Arguments) {
    write_line(std::io::stdout().lock(), &args.to_string());
}

/// A block of lines of mura's own layout (a table) to standard output, each escaped.
pub fn block(text: &str) {
    let mut stdout = std::io::stdout().lock();
    for l in text.trim_end_matches('\n').split('\n') {
        write_line(&mut stdout, l);
    }
}

/// One line to standard error (what [`note!`] expands to).
pub fn note(args: std::fmt::Arguments) {
    write_line(std::io::stderr().lock(), &args.to_string());
}

/// The one line a failed command ends with: `error: ` and the whole context chain.
pub fn error_line(e: &anyhow::Error) {
    note(format_args!("error: {e:#}"));
}

/// `println!` through the output layer: one escaped line, a closed stream ignored.
#[macro_export]
macro_rules! out {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}

/// `eprintln!` through the output layer: one escaped line, a closed stream ignored.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::out::note(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_from_files_print_as_one_line() {
        assert_eq!(escape("plain ünïcode\tok"), "plain ünïcode\tok");
        assert_eq!(
            escape("x\nerror: forged\r\u{1b}[2J"),
            "x\\nerror: forged\\r\\u{1b}[2J"
        );
        assert_eq!(escape("a\u{202e}b"), "a\\u{202e}b");
    }
}

/// Whether a long command reports its progress (bars on stderr; a training run's epoch lines) or
/// runs quietly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Bars,
    Quiet,
}

impl Progress {
    /// A bar of `len` steps drawn in `style`, or a hidden one when quiet.
    pub fn bar(self, len: u64, style: indicatif::ProgressStyle) -> indicatif::ProgressBar {
        match self {
            Progress::Bars => indicatif::ProgressBar::new(len).with_style(style),
            Progress::Quiet => indicatif::ProgressBar::hidden(),
        }
    }
}
