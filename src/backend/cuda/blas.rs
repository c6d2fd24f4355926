//! cuBLAS: one handle per backend, on the compute stream, and the projection GEMM (writing `h`
//! in f32, or in the inputs' half dtype: docs/DESIGN.md section 2.5).
//!
//! PyTorch's `nn.Linear` layout makes the projection a "TN" GEMM in cuBLAS's column-major terms:
//! row-major `H[n, D] = X[n, k] W^T` is column-major `H^T[D, n] = W^T(op T) . X^T`, where the
//! row-major `W[D, k]` is read as column-major `[k, D]` (lda = k) and transposed, and `X[n, k]`
//! row-major is column-major `[k, n]` (ldb = k). No transposed copy of anything is made.

use std::ffi::c_void;

use cudarc::cublas::result as br;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasMath_t, cublasOperation_t,
    cudaDataType,
};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

use super::libs::guard;
use crate::tensor::DType;

/// A cuBLAS handle bound to one stream.
pub(crate) struct Blas {
    handle: cublasHandle_t,
    allow_tf32: bool,
}

// SAFETY: a cuBLAS handle may be used from any thread as long as calls are not concurrent
// (`&mut self` on every use) and the owning context is current (the backend binds it first).
unsafe impl Send for Blas {}

impl Blas {
    /// Creates a handle on `stream` (the context must be current). f32 GEMMs use TF32 tensor
    /// cores only when `allow_tf32`.
    pub fn new(stream: CUstream, allow_tf32: bool) -> Result<Blas, String> {
        guard("libcublas", || {
            let handle = br::create_handle().map_err(|e| format!("cublasCreate: {e}"))?;
            let blas = Blas { handle, allow_tf32 };
            // SAFETY: live handle; `stream` belongs to the current context.
            unsafe { br::set_stream(handle, stream as _) }
                .map_err(|e| format!("cublasSetStream: {e}"))?;
            let mode = if allow_tf32 {
                cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            // SAFETY: live handle.
            unsafe { cudarc::cublas::sys::cublasSetMathMode(handle, mode) }
                .result()
                .map_err(|e| format!("cublasSetMathMode: {e}"))?;
            Ok(blas)
        })
    }

    /// `h[n, d_out] = x[n, k] . w[d_out, k]^T`, both operands in `dtype`, f32 accumulation
    /// (tensor cores for f16/bf16; TF32 for f32 only if allowed), `h` written in `h_dtype`: f32,
    /// or `dtype` itself when that is f16/bf16 (the f32 sum rounded once on output; docs/DESIGN.md
    /// section 2.5). Queued on the handle's stream.
    ///
    /// # Safety
    /// `w` holds `d_out * k` and `x` holds `n * k` elements of `dtype`, `h` holds `n * d_out`
    /// elements of `h_dtype`, all device memory of the current context that stays allocated
    /// until the stream has executed the GEMM.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn project(
        &mut self,
        dtype: DType,
        h_dtype: DType,
        n: usize,
        d_out: usize,
        k: usize,
        w: CUdeviceptr,
        x: CUdeviceptr,
        h: CUdeviceptr,
    ) -> Result<(), String> {
        let (ty, compute) = match dtype {
            DType::F32 if self.allow_tf32 => (
                cudaDataType::CUDA_R_32F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
            DType::F32 => (
                cudaDataType::CUDA_R_32F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            DType::F16 => (
                cudaDataType::CUDA_R_16F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            DType::BF16 => (
                cudaDataType::CUDA_R_16BF,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        let h_ty = match h_dtype {
            DType::F32 => cudaDataType::CUDA_R_32F,
            // cuBLAS offers f16/bf16 output with CUBLAS_COMPUTE_32F (f32 alpha/beta) only for
            // operands of the same dtype.
            t if t == dtype => ty,
            t => {
                return Err(format!(
                    "GEMM of {dtype:?} operands cannot write h in {t:?}"
                ))
            }
        };
        let dim = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| format!("GEMM {what} = {v} exceeds i32"))
        };
        let (m, nn, kk) = (dim(d_out, "D")?, dim(n, "rows")?, dim(k, "width")?);
        let alpha = 1.0f32;
        let beta = 0.0f32;
        let handle = self.handle;
        guard("cublasGemmEx", || {
            // SAFETY: the caller guarantees the operand sizes and lifetimes; alpha/beta are host
            // f32 scalars (default host pointer mode, f32 compute) read before the call returns.
            unsafe {
                br::gemm_ex(
                    handle,
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    m,
                    nn,
                    kk,
                    &alpha as *const f32 as *const c_void,
                    w as *const c_void,
                    ty,
                    kk,
                    x as *const c_void,
                    ty,
                    kk,
                    &beta as *const f32 as *const c_void,
                    h as *mut c_void,
                    h_ty,
                    m,
                    compute,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| {
                format!("cublasGemmEx ({dtype:?} -> h {h_dtype:?}, D={d_out}, n={n}, k={k}): {e}")
            })
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle is live and destroyed once; the owner synchronised its stream.
        let _ = unsafe { br::destroy_handle(self.handle) };
    }
}
