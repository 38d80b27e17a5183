//! Writing safetensors the way transformers writes them: `{"format": "pt"}` metadata (transformers refuses to load a
//! file without it), little-endian data, streamed tensor by tensor so no second copy of the model is held.
//! candle's own writer omits the metadata, and its `View` impl is for a different `safetensors` major version.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, View};

struct TensorView {
    dtype: Dtype,
    shape: Vec<usize>,
    tensor: Tensor,
}

impl TensorView {
    fn new(tensor: &Tensor) -> Result<Self> {
        let dtype = match tensor.dtype() {
            DType::F32 => Dtype::F32,
            DType::BF16 => Dtype::BF16,
            DType::F16 => Dtype::F16,
            DType::F64 => Dtype::F64,
            DType::U8 => Dtype::U8,
            DType::U32 => Dtype::U32,
            DType::I64 => Dtype::I64,
            other => bail!("cannot write a {other:?} tensor to safetensors"),
        };
        let shape = tensor.dims().to_vec();
        let tensor = tensor.to_device(&Device::Cpu)?.flatten_all()?;
        Ok(Self { dtype, shape, tensor })
    }

    fn bytes(&self) -> candle_core::Result<Vec<u8>> {
        fn le<T, const N: usize>(v: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            v.into_iter().flat_map(f).collect()
        }
        let t = &self.tensor;
        Ok(match t.dtype() {
            DType::F32 => le(t.to_vec1::<f32>()?, f32::to_le_bytes),
            DType::BF16 => le(t.to_vec1::<half::bf16>()?, |x| x.to_bits().to_le_bytes()),
            DType::F16 => le(t.to_vec1::<half::f16>()?, |x| x.to_bits().to_le_bytes()),
            DType::F64 => le(t.to_vec1::<f64>()?, f64::to_le_bytes),
            DType::U8 => t.to_vec1::<u8>()?,
            DType::U32 => le(t.to_vec1::<u32>()?, u32::to_le_bytes),
            DType::I64 => le(t.to_vec1::<i64>()?, i64::to_le_bytes),
            other => unreachable!("checked in TensorView::new: {other:?}"),
        })
    }
}

impl View for &TensorView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        // `View` cannot fail; a CPU tensor of a checked dtype always converts.
        Cow::Owned(self.bytes().expect("tensor bytes"))
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Write `tensors` (HF names) to `path` with `{"format": "pt"}` metadata, then fsync.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        views.push((name.as_str(), TensorView::new(t).with_context(|| format!("tensor `{name}`"))?));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views.iter().map(|(n, v)| (*n, v)), Some(metadata), path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    super::fsio::sync_file(path)
}
