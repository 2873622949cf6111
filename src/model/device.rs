//! `train.device` / `--device`: `cpu`, `cuda`, `cuda:N`, `auto`.

use anyhow::{bail, Result};
use candle_core::Device;

use crate::config::Precision;

/// The device for a spec. `auto` is CUDA when this binary has CUDA support, a GPU answers and a
/// tiny training step of every op passes on it ([`smoke_test`]), else the CPU; it prints which
/// device it chose and why. Asking for `cuda` from a CPU-only build is an error that says how to
/// get one.
pub fn select(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "auto" => {
            let (device, why) = auto();
            eprintln!("train.device = \"auto\": {} ({why})", name(&device));
            return Ok(device);
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
    Device::new_cuda(ordinal).map_err(|e| {
        anyhow::anyhow!(
            "device {spec:?}: no usable NVIDIA GPU/driver: {}",
            first_line(&e)
        )
    })
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
        Device::Cuda(_) => match d.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// The first line of an error (Candle's CUDA errors carry a backtrace).
fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// What `auto` picks, and why: never a device that cannot train.
fn auto() -> (Device, String) {
    if !cfg!(feature = "cuda") {
        return (Device::Cpu, "this binary was built without CUDA".into());
    }
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            return (
                Device::Cpu,
                format!("no usable NVIDIA GPU/driver: {}", first_line(&e)),
            )
        }
    };
    match smoke_test(&gpu) {
        Ok(()) => (
            gpu,
            "a GPU answered and a training step of every op passed on it; \
             train.device = \"cpu\" trains on the CPU instead"
                .into(),
        ),
        Err(e) => (
            Device::Cpu,
            format!("the GPU failed a training step: {e:#}; falling back to the CPU"),
        ),
    }
}

/// A tiny training step of every op the models use (convolutions of each kind with bias,
/// BatchNorm with and without ReLU, the ResNet stem's max-pool, residual add + ReLU, bilinear
/// resize, transposed convolution, a cross-entropy-like loss and its backward) on `device`,
/// checked against the same step on the CPU custom ops. The error names the op that failed.
pub fn smoke_test(device: &Device) -> Result<()> {
    use super::ops;
    use candle_core::{DType, Tensor, Var};
    let run = |dev: &Device| -> anyhow::Result<(f64, f64)> {
        let vals = |n: usize, k: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * k) % 17) as f32 / 8.0 - 1.0).collect()
        };
        let var = |shape: &[usize], k: usize| -> anyhow::Result<Var> {
            let n = shape.iter().product();
            Ok(Var::from_tensor(&Tensor::from_vec(
                vals(n, k),
                shape,
                dev,
            )?)?)
        };
        let x = Tensor::from_vec(vals(2 * 3 * 12 * 12, 5), (2, 3, 12, 12), dev)?;
        let (w1, b1) = (var(&[4, 3, 3, 3], 7)?, var(&[4], 3)?);
        let (w2, w3, wt) = (
            var(&[4, 4, 1, 1], 11)?,
            var(&[4, 4, 3, 3], 13)?,
            var(&[4, 2, 2, 2], 3)?,
        );
        let (g1, b1n, g2, b2n) = (var(&[4], 5)?, var(&[4], 9)?, var(&[4], 5)?, var(&[4], 9)?);
        let bn = |c: usize, weight: &Var, bias: &Var| -> candle_core::Result<ops::BatchNorm2d> {
            Ok(ops::BatchNorm2d {
                weight: weight.clone(),
                bias: bias.clone(),
                running_mean: Var::zeros(c, DType::F32, dev)?,
                running_var: Var::ones(c, DType::F32, dev)?,
                momentum: 0.1,
                eps: 1e-5,
            })
        };
        let step = || -> candle_core::Result<(Tensor, Tensor)> {
            let y = ops::conv2d(&x, w1.as_tensor(), Some(b1.as_tensor()), 2, 1, 1)?;
            let y = bn(4, &g1, &b1n)?.forward_relu(&y, true)?;
            let y = ops::max_pool2d(&y, 3, 2, 1)?;
            let z = ops::conv2d(&y, w2.as_tensor(), None, 1, 0, 1)?;
            let z = bn(4, &g2, &b2n)?.forward(&z, true)?;
            let z = ops::conv2d(&z, w3.as_tensor(), None, 1, 2, 2)?;
            let y = ops::add_relu(&z, &y)?;
            let y = ops::relu(&ops::conv_transpose2d(&y, wt.as_tensor(), None, 2)?)?;
            let y = ops::resize_bilinear(&y, 12, 12)?;
            let loss = candle_nn::ops::log_softmax(&y, 1)?.mean_all()?.neg()?;
            let grads = loss.backward()?;
            let g = grads
                .get(w1.as_tensor())
                .ok_or_else(|| {
                    candle_core::Error::Msg("no gradient reached the first conv".into())
                })?
                .sqr()?
                .sum_all()?;
            Ok((loss, g))
        };
        let (loss, g) = step()?;
        let f =
            |t: Tensor| -> anyhow::Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        Ok((f(loss)?, f(g)?))
    };
    let (l_dev, g_dev) = run(device)?;
    // The reference: the CPU custom ops (also when a test forces the generic path).
    let previous = ops::set_force_generic(false);
    let reference = run(&Device::Cpu);
    ops::set_force_generic(previous);
    let (l_cpu, g_cpu) = reference?;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b.abs().max(1e-6);
    if !close(l_dev, l_cpu) || !close(g_dev, g_cpu) || !l_dev.is_finite() {
        bail!(
            "{}: a training step disagrees with the CPU (loss {l_dev} vs {l_cpu}, |grad|² {g_dev} vs {g_cpu})",
            name(device)
        );
    }
    Ok(())
}

/// GPU memory of a CUDA device, MiB: the peak in use since the last [`reset_gpu_peak`] (the
/// high watermark of the device's default memory pool, from which Candle allocates through
/// cudarc's stream-ordered allocator) and what the whole device has in use now. `None` on the
/// CPU, in a CPU-only build, or when the driver does not answer.
pub fn gpu_memory_mib(device: &Device) -> Option<(f64, f64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return cuda_mem::query(d).map(|(peak, used)| (peak as f64 / MIB, used as f64 / MIB));
    }
    let _ = device;
    None
}

/// Starts a new peak for [`gpu_memory_mib`] (no-op off CUDA).
pub fn reset_gpu_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        cuda_mem::reset(d);
    }
    let _ = device;
}

#[cfg(feature = "cuda")]
const MIB: f64 = 1024.0 * 1024.0;

#[cfg(feature = "cuda")]
mod cuda_mem {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    /// The default memory pool of `d`'s device, with its context bound to this thread.
    fn pool(d: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        stream.synchronize().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out-pointer to a local.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    /// (peak bytes used in the default pool, bytes used on the whole device).
    pub fn query(d: &CudaDevice) -> Option<(u64, u64)> {
        let stream = d.cuda_stream();
        let (free, total) = stream.context().mem_get_info().ok()?;
        let mut high: u64 = 0;
        let pool = pool(d)?;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute; `high` outlives the call.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut high as *mut u64).cast(),
            )
        };
        let used = (total - free) as u64;
        Some((
            if r == sys::CUresult::CUDA_SUCCESS {
                high
            } else {
                used
            },
            used,
        ))
    }

    pub fn reset(d: &CudaDevice) {
        if let Some(pool) = pool(d) {
            let mut zero: u64 = 0;
            // SAFETY: resetting a high watermark takes a cuuint64_t zero.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast(),
                );
            }
        }
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
