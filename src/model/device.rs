//! `train.device` / `--device`: `cpu`, `cuda`, `cuda:N`, `auto`; and which
//! `train.precision` each device can train in.

use anyhow::{bail, Result};
use candle_core::Device;

use crate::config::Precision;

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

/// Refuse a `train.precision` that `device` cannot train in. Every device trains in `f32`
/// only, for now: the model, the losses and the optimiser state are f32 throughout. This is
/// the one place that decides; a device that gains bf16 (CUDA) is allowed here.
pub fn check_precision(precision: Precision, device: &Device) -> Result<()> {
    match precision {
        Precision::F32 => Ok(()),
        other => bail!(
            "train.precision = {:?} is not supported on the {} device yet: driveline trains in \
             f32 only (remove the key or set train.precision = \"f32\")",
            other.as_str(),
            kind(device)
        ),
    }
}

/// The device's kind, as `train.device` names it.
fn kind(d: &Device) -> &'static str {
    match d {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

/// A short human name for a device.
pub fn name(d: &Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_f32_trains_for_now() {
        assert!(check_precision(Precision::F32, &Device::Cpu).is_ok());
        for (p, name) in [(Precision::Bf16, "\"bf16\""), (Precision::Tf32, "\"tf32\"")] {
            let err = check_precision(p, &Device::Cpu).unwrap_err().to_string();
            assert!(
                err.contains(&format!("train.precision = {name}")) && err.contains("cpu"),
                "{err}"
            );
        }
    }
}
