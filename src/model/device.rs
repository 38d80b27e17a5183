//! Device and dtype selection from the strings users write (`auto`, `cpu`, `cuda`, `cuda:1`, `metal`;
//! `auto`, `f32`, `bf16`).

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// `auto` takes the first GPU this binary was built for, else the CPU.
pub fn select_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Ok(Device::new_cuda(0)?)
            } else if candle_core::utils::metal_is_available() {
                Ok(Device::new_metal(0)?)
            } else {
                Ok(Device::Cpu)
            }
        }
        "cpu" => Ok(Device::Cpu),
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                bail!("device \"metal\": this binary was built without the `metal` feature or no Metal GPU is present");
            }
            Ok(Device::new_metal(0)?)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => {
                    n.parse::<usize>().map_err(|_| anyhow::anyhow!("device {s:?}: expected cuda:N with N a number"))?
                }
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("device {s:?}: this binary was built without the `cuda` feature (cargo build --features cuda)");
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("unknown device {other:?} (expected auto, cpu, cuda, cuda:N or metal)"),
    }
}

/// `auto` is f32 on the CPU (Candle has no fast CPU bf16 matmul) and bf16 on a GPU.
pub fn select_dtype(spec: &str, device: &Device) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(if device.is_cpu() { DType::F32 } else { DType::BF16 }),
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => bail!("unknown dtype {other:?} (expected auto, f32 or bf16)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert!(select_device("cpu").unwrap().is_cpu());
        assert!(select_device("auto").is_ok());
        assert!(select_device("tpu").unwrap_err().to_string().contains("expected auto, cpu"));
        assert!(select_device("cuda:x").is_err());
        assert_eq!(select_dtype("auto", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(select_dtype("bf16", &Device::Cpu).unwrap(), DType::BF16);
        assert!(select_dtype("f16", &Device::Cpu).unwrap_err().to_string().contains("f16"));
    }
}
