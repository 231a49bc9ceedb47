//! The weights layer's errors, typed where a caller or a test tells them apart: weights that
//! are not a model's (a missing, unexpected, duplicate, mis-shaped or mis-typed key, a value no
//! trained model holds), bytes that are not a safetensors file, a dtype mura does not hold.
//!
//! The checks return these; the layers above carry them inside `anyhow::Error` (with context
//! added on the way up), and [`Error::find`] recovers the typed error from such a chain.

/// What is wrong with a set of weights or a weights file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Weights refused by a check (`what` says which), with the problems it found, each naming
    /// its key; the message shows the first few.
    #[error("{what}: {}", shown(problems))]
    Refused {
        what: String,
        problems: Vec<Problem>,
    },
    /// Bytes that are not a safetensors file (`0` says how).
    #[error("not a valid safetensors file ({0})")]
    NotSafetensors(String),
    /// A tensor of a dtype mura does not hold (F16, BF16, …).
    #[error("tensor '{key}' has dtype {dtype}; mura checkpoints hold F32 and I64 tensors only")]
    UnsupportedDtype { key: String, dtype: String },
}

/// One key's problem, as [`Error::Refused`] lists them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Problem {
    #[error("missing key '{key}' (shape {shape:?})")]
    MissingKey { key: String, shape: Vec<usize> },
    #[error("unexpected key '{key}' (shape {shape:?})")]
    UnexpectedKey { key: String, shape: Vec<usize> },
    #[error("duplicate key '{key}'")]
    DuplicateKey { key: String },
    /// A shape other than the model's.
    #[error("key '{key}' has shape {have:?}, the model needs {want:?}")]
    Shape {
        key: String,
        have: Vec<usize>,
        want: Vec<usize>,
    },
    /// A tensor holding another number of values than its shape has elements.
    #[error("key '{key}' holds {values} values for shape {shape:?}")]
    Length {
        key: String,
        values: usize,
        shape: Vec<usize>,
    },
    /// A dtype other than the model's (`f32`, `i64` for `num_batches_tracked`).
    #[error("key '{key}' is {have}, the model needs {want}")]
    Dtype {
        key: String,
        have: String,
        want: &'static str,
    },
    /// NaN or ±∞ at `element`.
    #[error("key '{key}' holds {value} (element {element})")]
    NotFinite {
        key: String,
        value: f32,
        element: usize,
    },
    /// A negative running variance or `num_batches_tracked` (`what`) at `element`.
    #[error("key '{key}' holds a negative {what}, {value} (element {element})")]
    Negative {
        key: String,
        what: &'static str,
        value: String,
        element: usize,
    },
}

impl Problem {
    /// The key the problem is with.
    pub fn key(&self) -> &str {
        match self {
            Problem::MissingKey { key, .. }
            | Problem::UnexpectedKey { key, .. }
            | Problem::DuplicateKey { key }
            | Problem::Shape { key, .. }
            | Problem::Length { key, .. }
            | Problem::Dtype { key, .. }
            | Problem::NotFinite { key, .. }
            | Problem::Negative { key, .. } => key,
        }
    }
}

/// The first few `problems`, and how many there are in all when some are not shown.
fn shown(problems: &[Problem]) -> String {
    const SHOWN: usize = 5;
    let list: Vec<String> = problems.iter().take(SHOWN).map(|p| p.to_string()).collect();
    match problems.len() {
        n if n > SHOWN => format!("{} … ({n} problems in all)", list.join("; ")),
        _ => list.join("; "),
    }
}

impl Error {
    /// The outermost weights error in `e`'s chain of causes, if any.
    pub fn find(e: &anyhow::Error) -> Option<&Error> {
        e.chain().find_map(|cause| cause.downcast_ref::<Error>())
    }

    /// The problems of a [`Error::Refused`]; none for another error.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Error::Refused { problems, .. } => problems,
            _ => &[],
        }
    }

    /// Ok if there are no `problems`; else [`Error::Refused`] with `what`.
    pub fn refuse(problems: Vec<Problem>, what: impl Into<String>) -> Result<(), Error> {
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::Refused {
            what: what.into(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn found_through_context_and_shown_with_a_count() {
        let problems: Vec<Problem> = (0..7)
            .map(|i| Problem::DuplicateKey {
                key: format!("k{i}"),
            })
            .collect();
        let e = Error::refuse(problems, "refused")
            .context("loading w.safetensors")
            .unwrap_err();
        let found = Error::find(&e).expect("a weights error");
        assert_eq!(found.problems().len(), 7);
        assert_eq!(found.problems()[6].key(), "k6");
        assert_eq!(
            format!("{e:#}"),
            "loading w.safetensors: refused: duplicate key 'k0'; duplicate key 'k1'; \
             duplicate key 'k2'; duplicate key 'k3'; duplicate key 'k4' … (7 problems in all)"
        );
        assert!(Error::refuse(vec![], "refused").is_ok());
        assert!(Error::find(&anyhow::anyhow!("refused: duplicate key 'k0'")).is_none());
    }
}
