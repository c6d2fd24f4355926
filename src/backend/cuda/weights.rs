//! The head's parameters on the device: epilogue parameters in f32, and the projection weights
//! in each GEMM dtype they are needed in (f32 always; f16/bf16 converted once, on first use by
//! an input of that dtype, and kept).

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::CudaContext;
use half::{bf16, f16};

use super::mem::{align256, DeviceBuf, GrowOnly};
use crate::model::FusionHead;
use crate::tensor::DType;

/// Projection weights of every modality in one dtype, in one buffer (PyTorch `[D, d_m]` layout).
struct WeightSet {
    buf: DeviceBuf,
    offsets: Vec<usize>,
}

/// A head uploaded to one device.
pub(crate) struct DeviceHead {
    /// The host head.
    pub head: Arc<FusionHead>,
    ctx: Arc<CudaContext>,
    params: DeviceBuf,
    /// `bias` `[M, D]`, `gate`, `gamma`, `beta` `[D]`: byte offsets in `params`.
    param_offsets: [usize; 4],
    /// Indexed by [`slot`]; `Some(None)`: the weights do not fit that dtype (f16 overflow).
    sets: [Option<Option<WeightSet>>; 3],
}

fn slot(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

impl DeviceHead {
    /// Uploads the epilogue parameters and the f32 weights (synchronously).
    pub fn upload(ctx: &Arc<CudaContext>, head: Arc<FusionHead>) -> Result<DeviceHead, String> {
        let (d, m) = (head.dim, head.num_modalities());
        let mut host: Vec<f32> = Vec::with_capacity(m * d + 3 * d);
        let mut offs = [0usize; 4];
        let mut bytes = Vec::new();
        let push = |v: &[f32], bytes: &mut Vec<u8>| {
            let off = bytes.len();
            bytes.extend_from_slice(bytemuck::cast_slice(v));
            bytes.resize(align256(bytes.len()), 0);
            off
        };
        for b in &head.proj_bias {
            host.extend_from_slice(b);
        }
        offs[0] = push(&host, &mut bytes);
        offs[1] = push(&head.gate, &mut bytes);
        offs[2] = push(&head.norm_weight, &mut bytes);
        offs[3] = push(&head.norm_bias, &mut bytes);
        let mut params = DeviceBuf::new(ctx);
        params.reserve(bytes.len())?;
        params.upload(0, &bytes)?;
        let mut dh = DeviceHead {
            head,
            ctx: ctx.clone(),
            params,
            param_offsets: offs,
            sets: [None, None, None],
        };
        dh.ensure(DType::F32)?;
        let wd = dh.head.weight_dtype;
        dh.ensure(wd)?;
        Ok(dh)
    }

    /// Device addresses of `bias`, `gate`, `gamma`, `beta`.
    pub fn params(&self) -> [CUdeviceptr; 4] {
        self.param_offsets.map(|o| self.params.ptr() + o as u64)
    }

    /// Makes the weights available in `dtype`; returns false when they do not fit it.
    pub fn ensure(&mut self, dtype: DType) -> Result<bool, String> {
        let s = slot(dtype);
        if let Some(set) = &self.sets[s] {
            return Ok(set.is_some());
        }
        let mut bytes: Vec<u8> = Vec::new();
        let mut offsets = Vec::new();
        for w in &self.head.proj_weight {
            offsets.push(bytes.len());
            match dtype {
                DType::F32 => bytes.extend_from_slice(bytemuck::cast_slice(w)),
                DType::F16 => {
                    for v in w {
                        let h = f16::from_f32(*v);
                        if !h.is_finite() {
                            self.sets[s] = Some(None);
                            return Ok(false);
                        }
                        bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                    }
                }
                DType::BF16 => {
                    for v in w {
                        let h = bf16::from_f32(*v);
                        if !h.is_finite() {
                            self.sets[s] = Some(None);
                            return Ok(false);
                        }
                        bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                    }
                }
            }
            bytes.resize(align256(bytes.len()), 0);
        }
        let mut buf = DeviceBuf::new(&self.ctx);
        buf.reserve(bytes.len())?;
        buf.upload(0, &bytes)?;
        self.sets[s] = Some(Some(WeightSet { buf, offsets }));
        Ok(true)
    }

    /// Device address of modality `i`'s weights in `dtype` (after a successful [`Self::ensure`]).
    pub fn weight(&self, dtype: DType, i: usize) -> Option<CUdeviceptr> {
        let set = self.sets[slot(dtype)].as_ref()?.as_ref()?;
        set.offsets.get(i).map(|o| set.buf.ptr() + *o as u64)
    }
}
