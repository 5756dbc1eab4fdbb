// The kernel ABI of the SpQR kernels (kernels/spqr_matmul.cu): the structs their parameters are made of. Device
// code only: the kernels are launched by the Python launcher (spqr_run/gpu/spqr_matmul.py, through the driver's
// cuLaunchKernel), which builds these structs byte for byte (ctypes), so every field, its order and its size
// here is part of that contract.
//
// Compiled by nvcc (the shipped cubins, spqr_run/gpu/build.py), by NVRTC at model load (no C++ standard
// library there: the fixed-width types come from below) and by g++ in the CPU execution shim (kernels/testing/).
//
// The packed layout is the .spqr tile layout (docs/FORMAT.md, spqr_run/quant/tile_layout.py, the single source
// of truth): `tiles` int32 (RT, KB, R), one 16-byte aligned record per 16 rows x 64 stored columns, in
// mma.m16n8k16 A-fragment order; outliers as packed (fp16 delta | stored column << 16) words with CSR row
// pointers over the RT*16 padded rows. Kernels never read the permutation: callers pass x_stored = x[:, perm].
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC: no standard headers. The kernels use these types and memcpy (a device built-in there).
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#else
#include <cstddef>
#include <cstdint>
#include <cstring>
#endif

#include <cuda_fp16.h>

// One packed SpQR linear (out_features x in_features). Every pointer is a device pointer. 40 bytes, 8-aligned.
struct SpqrLayer {
  const int32_t* tiles;            // (RT, KB, R) records, 16-byte aligned; R = 32*wbits + 4*stat_bits + 8
  const int32_t* outliers;         // (nnz,) bits 0..15 fp16 delta, bits 16..31 stored column (unsigned)
  const int32_t* outlier_row_ptr;  // (RT*16 + 1,) CSR pointers over the padded rows
  int out_features;
  int in_features;
  int wbits;      // 2, 3 or 4: the kernel instance's W (the launcher checks they agree)
  int stat_bits;  // 2, 3 or 4: the kernel instance's SB
};

// Optional bias (out,), added in fp32 before the single rounding to fp16: at most one pointer is non-null.
// 16 bytes, 8-aligned.
struct SpqrBias {
  const __half* f16;
  const float* f32;
};
