//! Direct access to the f32 storage of CPU tensors, for kernels that Candle's ops cannot express without
//! temporaries: the optimizer updates parameters and moments in place in one pass, decoding reads weights as
//! slices. Other devices and dtypes take the tensor-op paths.

use std::cell::RefCell;

use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};

/// Whether `t` can be read and written through [`with_f32_mut`] / [`with_f32`].
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// Whether `t` can be read through [`with_bf16`].
pub fn is_cpu_bf16(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::BF16 && t.is_contiguous()
}

struct WithMut<F>(RefCell<Option<F>>, RefCell<Option<anyhow::Error>>);

impl<F: FnOnce(&mut [f32]) -> Result<()>> InplaceOp1 for WithMut<F> {
    fn name(&self) -> &'static str {
        "optimizer-inplace"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("in-place update: f32 only") };
        let Some((a, b)) = layout.contiguous_offsets() else { candle_core::bail!("in-place update: not contiguous") };
        let f = self.0.borrow_mut().take().expect("called once");
        if let Err(e) = f(&mut data[a..b]) {
            *self.1.borrow_mut() = Some(e);
        }
        Ok(())
    }
}

/// Run `f` on the elements of the contiguous CPU f32 tensor `t`, mutably, in place (every tensor sharing its storage
/// sees the change).
pub fn with_f32_mut(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    if !is_cpu_f32(t) {
        bail!("in-place update needs a contiguous f32 CPU tensor, got {:?} on {:?}", t.dtype(), t.device());
    }
    let op = WithMut(RefCell::new(Some(f)), RefCell::new(None));
    t.inplace_op1(&op)?;
    match op.1.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Run `f` on the elements of the contiguous CPU bf16 tensor `t` (a LoRA base weight held in bf16, decoded
/// without a copy).
pub fn with_bf16<R>(t: &Tensor, f: impl FnOnce(&[half::bf16]) -> R) -> Result<R> {
    if !is_cpu_bf16(t) {
        bail!("direct read needs a contiguous bf16 CPU tensor, got {:?} on {:?}", t.dtype(), t.device());
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::BF16(data)) = &*storage else { bail!("direct read: not bf16 CPU storage") };
    let (a, b) = layout.contiguous_offsets().expect("checked contiguous");
    Ok(f(&data[a..b]))
}

/// Run `f` on the elements of the contiguous CPU f32 tensor `t`.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if !is_cpu_f32(t) {
        bail!("direct read needs a contiguous f32 CPU tensor, got {:?} on {:?}", t.dtype(), t.device());
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else { bail!("direct read: not f32 CPU storage") };
    let (a, b) = layout.contiguous_offsets().expect("checked contiguous");
    Ok(f(&data[a..b]))
}

/// The elements of a custom op's contiguous f32 CPU input; `what` names it in the error.
pub fn storage_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    storage(s, l, what)
}

/// The elements of a custom op's contiguous CPU input of element type `T`; `what` names it in the error.
pub fn storage<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let Ok(data) = s.as_slice::<T>() else { candle_core::bail!("{what} must be {}", T::DTYPE.as_str()) };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}
