// Launchers of the SpQR matmul kernels (kernels/spqr_matmul.cu): plain C++ on raw device pointers, so that
// nvcc alone compiles the kernels and the torch binding (kernels/spqr_ops.cpp) is the only file that knows torch.
//
// The packed layout is docs/FORMAT.md's (beta1 = beta2 = 16): tiles of 16 rows x 16 stored columns, row-tile
// major; per tile 8*wbits code words, stat_bits stat words (16 scale codes then 16 zero codes) and four fp16
// second-order numbers; CSR outliers with unsigned 16-bit stored-column indices; an optional permutation
// (stored column j = input feature perm[j]) held as unsigned 16-bit numbers.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Kernel launch: SPQR_LAUNCH(grid, block, smem, stream, kernel)(args...) is kernel<<<grid, block, smem, stream>>>(
// args...) under nvcc. The CPU execution shim (kernels/testing/cuda_shim.h) defines its own, which runs the grid
// on fibers; this macro is the only difference between the sources nvcc and the shim compile.
#ifndef SPQR_LAUNCH
#define SPQR_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

// One packed SpQR linear (out_features x in_features). Every pointer is a device pointer.
struct SpqrLayer {
  const int32_t* codes;            // (RT, CT, 8*wbits) uint32 bit patterns; 16-byte aligned
  const int32_t* stats;            // (RT, CT, stat_bits)
  const __half* second;            // (RT, CT, 4): s_scale, z_scale, s_zero, z_zero; 8-byte aligned
  const __half* outlier_values;    // (nnz,) delta added to the dense weight
  const uint16_t* outlier_cols;    // (nnz,) stored-column index, unsigned 16-bit
  const int32_t* outlier_row_ptr;  // (out+1,) CSR row pointers
  const uint16_t* perm;            // (in,) unsigned 16-bit, or nullptr for the identity
  int out_features;
  int in_features;
  int wbits;      // 2, 3 or 4
  int stat_bits;  // 2, 3 or 4
};

// Optional bias (out,), added in fp32 before the single rounding to fp16: at most one pointer is non-null.
struct SpqrBias {
  const __half* f16;
  const float* f32;
};

// True when kernels are compiled for this (wbits, stat_bits) pair.
bool spqr_kernels_support(int wbits, int stat_bits);

// y (out,) = W @ x[perm] + bias for one activation row x (in,). fp16 in/out, fp32 accumulation.
cudaError_t spqr_matvec(const SpqrLayer& layer, const __half* x, SpqrBias bias, __half* y, cudaStream_t stream);

// y (rows, out) = x[:, perm] @ W^T + bias for 1 <= rows <= 16 activation rows x (rows, in), row-major.
cudaError_t spqr_matmul_small(const SpqrLayer& layer, const __half* x, int rows, SpqrBias bias, __half* y,
                              cudaStream_t stream);

// w (out, in) row-major fp16 = the dequantized weight in *stored* (permuted) column order, outliers included;
// bit-identical to QuantizedLinear.dequantize() rounded to fp16.
cudaError_t spqr_dequantize(const SpqrLayer& layer, __half* w, cudaStream_t stream);
