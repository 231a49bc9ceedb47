//! Where a command runs: `--device cpu | emu | cuda[:N] | auto`.

use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

/// Written as its name (`"cuda:0"`) where it is stored (a run's config.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Device {
    /// The CPU reference backend.
    Cpu,
    /// The GPU op layer on the CPU emulator of the CUDA kernels.
    Emu,
    /// A real CUDA device by ordinal.
    Cuda(usize),
    /// CUDA device 0 if one is present, else the CPU.
    Auto,
}

impl FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "cpu" => Device::Cpu,
            "emu" => Device::Emu,
            "auto" => Device::Auto,
            "cuda" => Device::Cuda(0),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Device::Cuda(n),
                _ => bail!("unknown device '{s}': use cpu, emu, cuda, cuda:N or auto"),
            },
        })
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Emu => write!(f, "emu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Auto => write!(f, "auto"),
        }
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for Device {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Device> {
        s.parse()
    }
}
