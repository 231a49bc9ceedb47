//! The GPU layer's errors, typed where a caller branches on them: running out of device memory
//! is not a driver fault, a kernel that failed, or operands that do not fit.
//!
//! The drivers and the typed views create these; the layers above carry them inside
//! `anyhow::Error` (with context added on the way up), and [`Error::find`] recovers the typed
//! error from any such chain of causes, so a decision never rests on an error's text.

/// What went wrong on a GPU executor (a real device or the emulator).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The device could not provide the memory asked for (cuMemAlloc's
    /// `CUDA_ERROR_OUT_OF_MEMORY`, the emulator's device address space used up, a
    /// [`super::tracking::Tracking`] limit): a smaller batch may fit.
    #[error("out of device memory: {what}")]
    OutOfMemory { what: String },
    /// Any other failure of a driver call: no device, an argument the driver refuses, a call
    /// not allowed during a graph capture, or the fault of earlier asynchronous work reported
    /// by this call (an illegal address poisons every later call of its context).
    #[error("{call}: {message}")]
    Driver { call: String, message: String },
    /// A kernel that could not be launched (unknown, wrong parameters, a launch shape the
    /// device refuses) or that failed as it ran (the emulator's checkers, a fault reported by a
    /// synchronous launch).
    #[error("kernel {kernel}: {message}")]
    Kernel { kernel: String, message: String },
    /// Operands that do not fit what is launched or copied, refused before anything runs.
    #[error("{0}")]
    Shape(String),
}

impl Error {
    /// The outermost GPU error in `e`'s chain of causes, if any.
    pub fn find(e: &anyhow::Error) -> Option<&Error> {
        e.chain().find_map(|cause| cause.downcast_ref::<Error>())
    }

    /// Whether `e` is, at bottom, the device running out of memory.
    pub fn is_out_of_memory(e: &anyhow::Error) -> bool {
        matches!(Self::find(e), Some(Error::OutOfMemory { .. }))
    }
}

/// Returns an [`Error::Shape`] with a `format!` message: operands refused before a launch.
macro_rules! bail_shape {
    ($($arg:tt)*) => {
        anyhow::bail!($crate::gpu::Error::Shape(format!($($arg)*)))
    };
}
pub(crate) use bail_shape;

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn found_through_context_and_told_apart() {
        let oom: anyhow::Result<()> = Err(Error::OutOfMemory {
            what: "cuMemAlloc of 8 bytes".into(),
        }
        .into());
        let oom = oom
            .context("allocating a plan")
            .context("a batch of 4")
            .unwrap_err();
        assert!(Error::is_out_of_memory(&oom));
        assert_eq!(
            format!("{oom:#}"),
            "a batch of 4: allocating a plan: out of device memory: cuMemAlloc of 8 bytes"
        );
        let fault = anyhow::Error::from(Error::Driver {
            call: "cuMemAlloc".into(),
            message: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
        })
        .context("allocating a plan");
        assert!(!Error::is_out_of_memory(&fault));
        assert!(matches!(Error::find(&fault), Some(Error::Driver { .. })));
        // An error that merely says "out of memory" is not one.
        assert!(!Error::is_out_of_memory(&anyhow::anyhow!(
            "out of device memory"
        )));
    }
}
