// Launchers of the SpQR v2 kernels (kernels/spqr_matmul.cu): plain C++ on raw device pointers, so that nvcc
// alone compiles the kernels and the torch binding (kernels/spqr_ops.cpp) is the only file that knows torch.
//
// The packed layout is format version 2 (KERNELS_V2_SPEC.md section 2, spqr_run/quant/tile_layout.py, the single
// source of truth): `tiles` int32 (RT, KB, R), one 16-byte aligned record per 16 rows x 64 stored columns, in
// mma.m16n8k16 A-fragment order; outliers as packed (fp16 delta | stored column << 16) words with CSR row
// pointers over the RT*16 padded rows. Kernels never read the permutation: callers pass x_stored = x[:, perm].
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Kernel launch: SPQR_LAUNCH(grid, block, smem, stream, kernel)(args...) is kernel<<<grid, block, smem, stream>>>(
// args...) under nvcc. The CPU execution shim (kernels/testing/cuda_shim.h) defines its own, which runs the grid
// on fibers; this macro is the only difference between the sources nvcc and the shim compile.
#ifndef SPQR_LAUNCH
#define SPQR_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

// One packed SpQR linear (out_features x in_features), v2 layout. Every pointer is a device pointer.
struct SpqrLayer {
  const int32_t* tiles;            // (RT, KB, R) records, 16-byte aligned; R = 32*wbits + 4*stat_bits + 8
  const int32_t* outliers;         // (nnz,) bits 0..15 fp16 delta, bits 16..31 stored column (unsigned)
  const int32_t* outlier_row_ptr;  // (RT*16 + 1,) CSR pointers over the padded rows
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

// How spqr_matmul_small splits the work: `splits` blocks share each group of row tiles along K (1: no
// workspace), and the caller provides `workspace_floats` floats and `counters` zeroed ints (left zeroed).
struct SpqrSmallPlan {
  int splits;
  size_t workspace_floats;
  int counters;
};

// True when kernels are compiled for this (wbits, stat_bits) pair.
bool spqr_kernels_support(int wbits, int stat_bits);

// The split of spqr_matmul_small for this layer on a GPU with `num_sms` SMs and `blocks_per_sm` resident
// blocks of the kernel per SM (spqr_matmul_small_blocks_per_sm); whole waves, see the design notes.
SpqrSmallPlan spqr_matmul_small_plan(const SpqrLayer& layer, int num_sms, int blocks_per_sm);

// Resident blocks per SM of the small-batch kernel for these bits and row count (occupancy calculator).
int spqr_matmul_small_blocks_per_sm(int wbits, int stat_bits, int rows);

// y (rows, out) fp16 = x_stored (rows, in) fp16 @ W^T + bias for 1 <= rows <= 16, W in stored column order
// (x_stored = x[:, perm]). x_stored: 16-byte aligned rows of ldx >= ceil(in/64)*64 halves (whole records),
// ldx a multiple of 8, columns in..ldx-1 zero (callers pad when in % 64 != 0). fp32 accumulation;
// deterministic (fixed summation order, no float atomics). workspace: plan.workspace_floats floats (may be null when plan.splits == 1); counters:
// plan.counters ints, zero on entry, zero again on exit (a persistent buffer may be reused by later calls on
// the same stream). cudaErrorInvalidValue for arguments outside these rules.
cudaError_t spqr_matmul_small(const SpqrLayer& layer, const __half* x_stored, int ldx, int rows, SpqrBias bias,
                              __half* y, const SpqrSmallPlan& plan, float* workspace, int* counters,
                              cudaStream_t stream);

// w (out, in) row-major fp16 = the dequantized weight in stored (permuted) column order, outliers included,
// with the fp16 arithmetic of spqr_matmul_small (the rule under "Numerics" in spqr_matmul.cu) and the weight
// exponent k of each record.
cudaError_t spqr_dequantize(const SpqrLayer& layer, __half* w, cudaStream_t stream);
