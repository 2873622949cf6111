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

/// Refuse a `train.precision` that `device` cannot train in. `f32` trains everywhere; `tf32`
/// and `bf16` are CUDA's (tensor-core products); the CPU kernels are f32 (and f64) only, and a
/// bf16 product there would be an f32 one, widened and rounded, slower than f32. This is the one
/// place that decides; [`apply_precision`] turns the allowed one on.
pub fn check_precision(precision: Precision, device: &Device) -> Result<()> {
    check_precision_on(precision, kind(device))
}

fn check_precision_on(precision: Precision, kind: &str) -> Result<()> {
    match (precision, kind) {
        (Precision::F32, _) | (Precision::Tf32 | Precision::Bf16, "cuda") => Ok(()),
        (other, kind) => bail!(
            "train.precision = {:?} runs on CUDA only, not on the {kind} device, which trains in \
             f32 (remove the key or set train.precision = \"f32\")",
            other.as_str(),
        ),
    }
}

/// What [`apply_precision`] turned on; dropping it restores the previous settings.
#[must_use = "the precision reverts when the guard is dropped"]
pub struct PrecisionGuard {
    autocast: Option<candle_core::DType>,
    tf32: bool,
}

impl Drop for PrecisionGuard {
    fn drop(&mut self) {
        // Restoring a setting that was valid before cannot fail.
        let _ = crate::model::ops::set_autocast(self.autocast);
        candle_core::cuda::set_gemm_reduced_precision_f32(self.tf32);
    }
}

/// Turns `precision` on for training on `device` (after [`check_precision`]), until the guard
/// drops:
/// - `f32`: nothing; f32 products throughout.
/// - `tf32`: cuBLAS f32 GEMMs on TF32 tensor cores (10-bit mantissa products, f32 sums):
///   Candle's process-wide `set_gemm_reduced_precision_f32`, PyTorch's
///   `torch.backends.cuda.matmul.allow_tf32 = True`.
/// - `bf16`: autocast of the convolutions and GEMMs to bf16 with f32 master weights, optimiser
///   state, BatchNorm and loss, on the calling thread ([`crate::model::ops::set_autocast`]).
pub fn apply_precision(precision: Precision, device: &Device) -> Result<PrecisionGuard> {
    check_precision(precision, device)?;
    enable_precision(precision)
}

/// [`apply_precision`] without the device check: the benchmarks emulate bf16 on the CPU with it.
pub fn enable_precision(precision: Precision) -> Result<PrecisionGuard> {
    let guard = PrecisionGuard {
        autocast: crate::model::ops::autocast(),
        tf32: candle_core::cuda::gemm_reduced_precision_f32(),
    };
    match precision {
        Precision::F32 => {}
        Precision::Tf32 => candle_core::cuda::set_gemm_reduced_precision_f32(true),
        Precision::Bf16 => {
            crate::model::ops::set_autocast(Some(candle_core::DType::BF16))?;
        }
    }
    Ok(guard)
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
    fn reduced_precisions_train_on_cuda_only() {
        assert!(check_precision(Precision::F32, &Device::Cpu).is_ok());
        for (p, name) in [(Precision::Bf16, "\"bf16\""), (Precision::Tf32, "\"tf32\"")] {
            let err = check_precision(p, &Device::Cpu).unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "train.precision = {name} runs on CUDA only, not on the cpu device, which \
                     trains in f32 (remove the key"
                )),
                "{err}"
            );
            assert!(check_precision_on(p, "cuda").is_ok());
            assert!(check_precision_on(p, "metal").is_err());
        }
        assert!(check_precision_on(Precision::F32, "cuda").is_ok());
    }

    #[test]
    fn apply_precision_refuses_and_restores() {
        // f32 on the CPU changes nothing; a refused precision changes nothing either.
        let before = crate::model::ops::autocast();
        drop(apply_precision(Precision::F32, &Device::Cpu).unwrap());
        assert!(apply_precision(Precision::Bf16, &Device::Cpu).is_err());
        assert_eq!(crate::model::ops::autocast(), before);
        // The guard restores what was set before it, whatever that was.
        let prev = crate::model::ops::set_autocast(Some(candle_core::DType::BF16)).unwrap();
        drop(apply_precision(Precision::F32, &Device::Cpu).unwrap());
        assert_eq!(
            crate::model::ops::autocast(),
            Some(candle_core::DType::BF16)
        );
        crate::model::ops::set_autocast(prev).unwrap();
    }

    #[test]
    fn bf16_turns_autocast_on_while_the_guard_lives() {
        let before = crate::model::ops::autocast();
        let guard = enable_precision(Precision::Bf16).unwrap();
        assert_eq!(
            crate::model::ops::autocast(),
            Some(candle_core::DType::BF16)
        );
        drop(guard);
        assert_eq!(crate::model::ops::autocast(), before);
        let guard = enable_precision(Precision::Tf32).unwrap();
        assert_eq!(
            crate::model::ops::autocast(),
            before,
            "tf32 is not autocast"
        );
        drop(guard);
    }
}
