//! Choosing the compute device from `auto`, `cpu` or `cuda[:N]`.

use candle_core::{DType, Device};

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
