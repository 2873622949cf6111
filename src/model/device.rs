//! `train.device` / `--device`: `cpu`, `cuda`, `cuda:N`, `auto`.

use anyhow::{bail, Result};
use candle_core::Device;

/// The device for a spec. `auto` is CUDA when this binary has CUDA support and a GPU answers,
/// else the CPU. Asking for `cuda` from a CPU-only build is an error that says how to get one.
pub fn select(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "auto" => {
            return Ok(if cfg!(feature = "cuda") {
                Device::new_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            })
        }
        "cuda" => 0,
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => bail!("device {spec:?}: expected cpu, cuda, cuda:N or auto"),
        },
    };
    if !cfg!(feature = "cuda") {
        bail!(
            "device {spec:?}: this driveline binary was built without CUDA support \
             (build it with `just build-cuda`, or use device = \"cpu\" / \"auto\")"
        );
    }
    Device::new_cuda(ordinal)
        .map_err(|e| anyhow::anyhow!("device {spec:?}: no usable NVIDIA GPU/driver: {e}"))
}

/// A short human name for a device.
pub fn name(d: &Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
