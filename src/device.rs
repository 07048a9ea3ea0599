//! Choosing the compute device from `auto`, `cpu` or `cuda[:N]`.

use candle_core::{DType, Device, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: use auto, cpu or cuda[:N]")]
    Unknown(String),
    #[error("device `{0}` needs CUDA, but this mone was built without the `cuda` feature")]
    NoCuda(String),
    #[error("unknown dtype `{0}`: use f32, bf16 or f16")]
    UnknownDtype(String),
    #[error("could not open {0}: {1}")]
    Open(String, candle_core::Error),
}

/// Parse and open a device. `auto` picks CUDA device 0 when built with CUDA and one is
/// present, else the CPU.
pub fn open(spec: &str) -> Result<Device, DeviceError> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| DeviceError::Unknown(spec.to_string()))?,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(DeviceError::NoCuda(spec.to_string()));
            }
            Device::new_cuda(ordinal).map_err(|e| DeviceError::Open(spec.to_string(), e))
        }
        _ => Err(DeviceError::Unknown(spec.to_string())),
    }
}

/// Parse a weight and activation precision: f32, bf16 or f16. Reduced precision is for GPUs;
/// the CPU's fused kernels are f32 only.
pub fn parse_dtype(spec: &str) -> Result<DType, DeviceError> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(DeviceError::UnknownDtype(spec.to_string())),
    }
}

/// One (shape) u8 tensor on `device` from `parts` laid end to end. On CUDA the bytes go
/// through a page-locked staging buffer kept per thread, so the copy is a DMA that does not
/// block the host (a pageable copy is staged by the driver and synchronous); the buffer is
/// refilled only once the previous copy out of it has finished.
pub fn upload_u8(parts: &[&[u8]], shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if total != n {
        candle_core::bail!("upload: {total} bytes for a {shape:?} tensor of {n}");
    }
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) if n > 0 => pinned::upload(parts, n, shape, d),
        _ => Tensor::from_vec(parts.concat(), shape, device),
    }
}

#[cfg(feature = "cuda")]
mod pinned {
    use std::cell::RefCell;

    use candle_core::cuda_backend::cudarc::driver::{CudaEvent, PinnedHostSlice};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, Result, Storage, Tensor};

    struct Staging {
        device: candle_core::cuda_backend::DeviceId,
        host: PinnedHostSlice<u8>,
        /// Recorded after the last copy out of `host`.
        copied: Option<CudaEvent>,
    }

    thread_local! {
        static STAGING: RefCell<Option<Staging>> = const { RefCell::new(None) };
    }

    pub(super) fn upload(
        parts: &[&[u8]],
        n: usize,
        shape: &[usize],
        d: &CudaDevice,
    ) -> Result<Tensor> {
        let stream = d.cuda_stream();
        STAGING.with(|cell| {
            let mut cell = cell.borrow_mut();
            let fits = cell
                .as_ref()
                .is_some_and(|s| s.device == d.id() && s.host.len() >= n);
            if !fits {
                if let Some(old) = cell.take() {
                    if let Some(e) = &old.copied {
                        e.synchronize().w()?;
                    }
                }
                // Room for growth: batch sizes vary, and each page-locked allocation costs
                // milliseconds.
                let cap = n + n / 2;
                // SAFETY: the buffer is written in full below before its first copy.
                let host = unsafe { stream.context().alloc_pinned::<u8>(cap) }.w()?;
                *cell = Some(Staging {
                    device: d.id(),
                    host,
                    copied: None,
                });
            }
            let st = cell
                .as_mut()
                .ok_or_else(|| candle_core::Error::Msg("no staging buffer".into()))?;
            if let Some(e) = st.copied.take() {
                e.synchronize().w()?;
            }
            let host = st.host.as_mut_slice().w()?;
            let mut off = 0;
            for p in parts {
                host[off..off + p.len()].copy_from_slice(p);
                off += p.len();
            }
            // SAFETY: written in full by the copy just below.
            let mut dst = unsafe { d.alloc::<u8>(n)? };
            stream.memcpy_htod(&host[..n], &mut dst).w()?;
            st.copied = Some(stream.record_event(None).w()?);
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, d.clone()));
            Ok(Tensor::from_storage(
                storage,
                shape,
                BackpropOp::none(),
                false,
            ))
        })
    }
}

/// A short name for logs and events.
pub fn describe(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert!(matches!(open("cpu"), Ok(Device::Cpu)));
        assert!(matches!(open("CPU"), Ok(Device::Cpu)));
        assert!(open("auto").is_ok());
        assert!(matches!(open("tpu"), Err(DeviceError::Unknown(_))));
        assert_eq!(parse_dtype("BF16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("f32").unwrap(), DType::F32);
        assert!(matches!(
            parse_dtype("int8"),
            Err(DeviceError::UnknownDtype(_))
        ));
        if !candle_core::utils::cuda_is_available() {
            assert!(matches!(open("cuda:0"), Err(DeviceError::NoCuda(_))));
        }
    }
}
