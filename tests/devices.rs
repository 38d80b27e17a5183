//! The device choice in every build (issue 15), and tests that run on each device this machine has: the CPU
//! always, a CUDA GPU when the build has CUDA and one opens. CI runs this file in the CUDA build too, with a stub
//! driver and no GPU (scripts/cuda-check.sh), where `auto` must mean the CPU.

use candle_core::{DType, Device, Tensor};
use safe::model::{attention_mask, builtin, CausalLm};
use safe::recipe::DeviceSpec;

/// The devices to test on: the CPU, then CUDA's first GPU when this build can open one.
fn devices() -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    if let Ok(gpu) = Device::new_cuda(0) {
        out.push(gpu);
    }
    out
}

fn gpu_visible() -> bool {
    devices().len() > 1
}

#[test]
fn auto_is_a_gpu_when_one_opens_else_the_cpu() {
    let device = DeviceSpec::Auto.device().unwrap();
    assert_eq!(device.is_cpu(), !gpu_visible(), "{device:?}");
}

#[test]
fn an_explicit_cuda_device_without_a_gpu_is_an_error_naming_it() {
    if gpu_visible() {
        return; // nothing to refuse here
    }
    // As the binary prints it (Candle's backtrace, there under RUST_BACKTRACE=1, left out).
    let e = safe::exit::Failure::bad_input("cuda".parse::<DeviceSpec>().unwrap().device().unwrap_err()).message();
    assert!(e.contains("opening cuda:0") && e.contains("--features cuda"), "{e}");
    assert!(!e.contains("candle_core::"), "no backtrace in the message: {e}");
}

/// The tiny model's logits on `device` in f32, as a host vector.
fn tiny_logits(device: &Device) -> Vec<f32> {
    let cfg = builtin::config("tiny").unwrap();
    let w = builtin::weights(&cfg, 7, device, DType::F32).unwrap();
    let model = CausalLm::from_tensors(&cfg, w, false, device, DType::F32).unwrap();
    let ids: [u32; 6] = [257, 50, 43, 51, 61, 258];
    let ids = Tensor::new(&ids[..], device).unwrap().unsqueeze(0).unwrap();
    let pos = Tensor::new(&[0u32, 1, 2, 3, 4, 5][..], device).unwrap().unsqueeze(0).unwrap();
    let mask = attention_mask(&[vec![true; 6]], 6, None, device).unwrap();
    let logits = model.forward(&ids, &pos, &mask, None).unwrap();
    logits.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_device(&Device::Cpu).unwrap().to_vec1().unwrap()
}

#[test]
fn decoder_logits_agree_on_every_device() {
    // f32 everywhere: a GPU's f32 matmuls (TF32 off by default in Candle) stay within 1e-4 of the CPU's.
    let cpu = tiny_logits(&Device::Cpu);
    assert!(cpu.iter().all(|x| x.is_finite()));
    for device in devices().iter().skip(1) {
        let got = tiny_logits(device);
        let worst = cpu.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{device:?}: max |Δlogit| = {worst}");
    }
}
