// PTX primitives of the SpQR kernels (issue #11, docs: KERNELS_V2 contract section 4): tensor-core mma,
// ldmatrix, cp.async, lop3 and prmt behind small named device functions.
//
// Under nvcc each function is one inline PTX instruction (sm_80+: mma.sync m16n8k16 and cp.async need sm_80,
// ldmatrix sm_75). Under the CPU execution shim (kernels/testing/cuda_shim.h defines SPQR_SHIM) each has an
// exact CPU implementation with the instruction's documented semantics (PTX ISA, "Warp-level matrix
// instructions", "cp.async", "lop3", "prmt"):
//   - mma_m16n8k16_f16f32 and ldmatrix_* are warp collectives: every lane of the warp must call them at the
//     same place with all 32 lanes converged (.sync.aligned); a lane elsewhere or exited is diagnosed like a
//     shuffle in divergent code. mma results follow the PTX ISA fragment layout (cuda_shim::Coll::Mma).
//     ldmatrix: lane i supplies the row address of row i % 8 of matrix i / 8 (x2: lanes 0..15); each row address
//     must be 16-byte aligned and inside a __shared__ variable, else the launch fails with the caller's
//     file:line; every lane then reads its own fragment words (so the sanitizers see the reads as its own).
//   - cp.async copies at cp_async_wait time, and poisons the destination (0xff bytes) at issue, so reading it
//     without the wait (or before the __syncthreads after it) reads NaN / -1. The source and destination must
//     be aligned to the copy's size and the destination must be shared memory (else: a fault with file:line).
//   - lop3 evaluates the LUT bitwise (LUT = F(0xF0, 0xCC, 0xAA)); prmt is prmt.b32 in its default mode (each
//     selector nibble: bits 0-2 pick a byte of {b, a}, bit 3 replicates that byte's sign bit).
//
// Register formats: an f16x2 register holds two halves, the lower column / lower k index in bits 0-15.
#pragma once

#if !defined(__CUDACC_RTC__)  // NVRTC: spqr_matmul.h gives the fixed-width types
#include <cstdint>
#endif
#if defined(SPQR_SHIM)
#include <cstring>
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kernels/spqr_ptx.cuh needs sm_80 or newer (mma.sync m16n8k16, cp.async)"
#endif

namespace spqr_ptx {

#if defined(SPQR_SHIM)
using Loc = cuda_shim::Loc;
#define SPQR_PTX_LOC , const ::spqr_ptx::Loc &loc = ::spqr_ptx::Loc::current()
#else
#define SPQR_PTX_LOC
#endif

// ---- shared-memory addresses -------------------------------------------------------------------------------
// SmemAddr: a shared-memory address. On the GPU, 32 bits in the shared window, taken once from a generic pointer
// (`smem_addr`, cvta.to.shared) and then moved by integer adds: nvcc and NVRTC alike keep each address in one
// 32-bit register and fold constant offsets into the instruction (NVRTC left alone computes generic shared
// addresses in 64 bits: +16 registers and +3% instructions at 9-16 rows; issue 22). Under the shim, a plain byte
// pointer, so the same `base + bytes` arithmetic works. The kernels use it for cp.async destinations and ldmatrix
// rows; their plain loads of shared memory stay C++ (inline-PTX loads cost nvcc and NVRTC alike ~3% more).
#if defined(SPQR_SHIM)
using SmemAddr = unsigned char*;
__device__ __forceinline__ SmemAddr smem_addr(const void* p) {
  return static_cast<SmemAddr>(const_cast<void*>(p));
}
#else
using SmemAddr = uint32_t;
__device__ __forceinline__ SmemAddr smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ---- mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 -------------------------------------------------------
// D (16x8 f32) = A (16x16 f16, row-major) * B (16x8 f16, column-major) + C (16x8 f32). Lane L, g = L >> 2,
// t = L & 3: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1], a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9];
// b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]; c[0..3], d[0..3] = C[g][2t], C[g][2t+1], C[g+8][2t],
// C[g+8][2t+1]. d may alias c. Warp collective.
__device__ __forceinline__ void mma_m16n8k16_f16f32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                    const float c[4] SPQR_PTX_LOC) {
#if defined(SPQR_SHIM)
  cuda_shim::Wide v{};
  for (int i = 0; i < 4; ++i) v.w[i] = a[i];
  v.w[4] = b[0];
  v.w[5] = b[1];
  std::memcpy(&v.w[6], c, 4 * sizeof(float));
  const cuda_shim::Wide r =
      cuda_shim::collective_wide(cuda_shim::Coll::Mma, 0xffffffffu, v, 0, 32, "mma_m16n8k16_f16f32", loc);
  std::memcpy(d, r.w, 4 * sizeof(float));
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// ---- ldmatrix.sync.aligned.m8n8.{x4,x2}{,.trans}.shared.b16 ------------------------------------------------
#if defined(SPQR_SHIM)
namespace detail {
// ldmatrix of `n` 8x8 b16 matrices: lane i posts the address of row i % 8 of matrix i / 8; lane L receives in
// r[j] the halves (row L / 4, cols 2 (L % 4), +1) of matrix j, or with `trans` (rows 2 (L % 4), +1; col L / 4).
inline void ldmatrix(uint32_t* r, int n, bool trans, const void* row_addr, const char* name, const Loc& loc) {
  const int lane = static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31;
  if (lane < 8 * n) {
    if (reinterpret_cast<uintptr_t>(row_addr) % 16 != 0) {
      cuda_shim::fail(loc, "%s: row address %p of lane %d is not 16-byte aligned", name, row_addr, lane);
    }
    if (!cuda_shim::is_shared(row_addr, 16)) {
      cuda_shim::fail(loc, "%s: row address %p of lane %d is not inside a __shared__ variable", name, row_addr,
                      lane);
    }
  }
  cuda_shim::Wide v{};
  const auto addr = reinterpret_cast<uintptr_t>(row_addr);
  v.w[0] = static_cast<uint32_t>(addr);
  v.w[1] = static_cast<uint32_t>(static_cast<uint64_t>(addr) >> 32);
  const int g = lane >> 2, t = lane & 3;
  for (int k = 0; k < 8; ++k) v.w[2 + k] = 0xffffffffu;
  for (int j = 0; j < n; ++j) {
    if (trans) {
      v.w[2 + 2 * j] = static_cast<uint32_t>(8 * j + 2 * t);
      v.w[3 + 2 * j] = static_cast<uint32_t>(8 * j + 2 * t + 1);
    } else {
      v.w[2 + j] = static_cast<uint32_t>(8 * j + g);
    }
  }
  const cuda_shim::Wide rows = cuda_shim::collective_wide(cuda_shim::Coll::Gather, 0xffffffffu, v, 0, 32, name, loc);
  auto row = [&](int k) {
    return reinterpret_cast<const uint16_t*>(rows.w[2 * k] | static_cast<uint64_t>(rows.w[2 * k + 1]) << 32);
  };
  for (int j = 0; j < n; ++j) {
    uint16_t lo, hi;
    if (trans) {
      lo = row(2 * j)[g];
      hi = row(2 * j + 1)[g];
    } else {
      lo = row(j)[2 * t];
      hi = row(j)[2 * t + 1];
    }
    r[j] = lo | static_cast<uint32_t>(hi) << 16;
  }
}
}  // namespace detail
#endif

// Four 8x8 b16 matrices from shared memory: lane i gives the (16-byte aligned) address of row i % 8 of matrix
// i / 8; r[j] = matrix j's halves (row L / 4, cols 2 (L % 4), 2 (L % 4) + 1) of lane L. Warp collective.
__device__ __forceinline__ void ldmatrix_x4_at(uint32_t r[4], SmemAddr row_addr SPQR_PTX_LOC) {
#if defined(SPQR_SHIM)
  detail::ldmatrix(r, 4, false, row_addr, "ldmatrix_x4", loc);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_addr)
               : "memory");
#endif
}

// The same with a generic pointer to the row.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row_addr SPQR_PTX_LOC) {
#if defined(SPQR_SHIM)
  detail::ldmatrix(r, 4, false, smem_row_addr, "ldmatrix_x4", loc);
#else
  ldmatrix_x4_at(r, smem_addr(smem_row_addr));
#endif
}

// Two 8x8 b16 matrices (lanes 0..15 give the row addresses; the others' are ignored).
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row_addr SPQR_PTX_LOC) {
#if defined(SPQR_SHIM)
  detail::ldmatrix(r, 2, false, smem_row_addr, "ldmatrix_x2", loc);
#else
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s)
               : "memory");
#endif
}

// As ldmatrix_x4, each matrix transposed: r[j] of lane L = matrix j's (rows 2 (L % 4), +1; col L / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row_addr SPQR_PTX_LOC) {
#if defined(SPQR_SHIM)
  detail::ldmatrix(r, 4, true, smem_row_addr, "ldmatrix_x4_trans", loc);
#else
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
#endif
}

// ---- cp.async ---------------------------------------------------------------------------------------------
#if defined(SPQR_SHIM)
namespace detail {
inline void cp_async(void* dst, const void* src, size_t bytes, const char* name, const Loc& loc) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    cuda_shim::fail(loc, "misaligned %s: destination %p, source %p (both must be multiples of %zu)", name, dst, src,
                    bytes);
  }
  if (!cuda_shim::is_shared(dst, bytes)) {
    cuda_shim::fail(loc, "%s: destination %p is not inside a __shared__ variable", name, dst);
  }
  auto* d = static_cast<volatile unsigned char*>(dst);
  for (size_t i = 0; i < bytes; ++i) d[i] = 0xff;  // undefined until the wait: poison
  cuda_shim::async_copy(dst, src, bytes);
}
}  // namespace detail
#endif

// cp.async.cg.shared.global, 16 bytes (L2 only); both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16_at(SmemAddr dst, const void* gmem_src SPQR_PTX_LOC) {
#if defined(SPQR_SHIM)
  detail::cp_async(dst, gmem_src, 16, "cp_async_16", loc);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#endif
}

// The same with a generic pointer to the destination.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src SPQR_PTX_LOC) {
#if defined(SPQR_SHIM)
  detail::cp_async(smem_dst, gmem_src, 16, "cp_async_16", loc);
#else
  cp_async_16_at(smem_addr(smem_dst), gmem_src);
#endif
}

// cp.async.ca.shared.global, 8 bytes; both addresses 8-byte aligned.
__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src SPQR_PTX_LOC) {
#if defined(SPQR_SHIM)
  detail::cp_async(smem_dst, gmem_src, 8, "cp_async_8", loc);
#else
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem_src) : "memory");
#endif
}

// cp.async.ca.shared.global, 4 bytes; both addresses 4-byte aligned.
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src SPQR_PTX_LOC) {
#if defined(SPQR_SHIM)
  detail::cp_async(smem_dst, gmem_src, 4, "cp_async_4", loc);
#else
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem_src) : "memory");
#endif
}

// cp.async.commit_group: the calling thread's cp.async since the last commit form one group.
__device__ __forceinline__ void cp_async_commit() {
#if defined(SPQR_SHIM)
  cuda_shim::async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// cp.async.wait_group N: waits until at most the N most recent committed groups of the calling thread are
// pending (cp.async not yet committed are not waited for). Other threads see the data after a __syncthreads.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7");
#if defined(SPQR_SHIM)
  cuda_shim::AsyncCopy c;
  while (cuda_shim::async_next(N, &c)) {
    auto* d = static_cast<volatile unsigned char*>(c.dst);
    const auto* s = static_cast<const volatile unsigned char*>(c.src);
    for (size_t i = 0; i < c.bytes; ++i) d[i] = s[i];
  }
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ---- lop3.b32 / prmt.b32 ------------------------------------------------------------------------------------
// Any bitwise function of three words: LUT is the function applied to (0xF0, 0xCC, 0xAA), e.g.
// (a & b) | c = (0xF0 & 0xCC) | 0xAA = 0xEA.
template <uint8_t LUT>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
#if defined(SPQR_SHIM)
  uint32_t r = 0;
  for (int k = 0; k < 8; ++k) {  // minterm k = (a bit, b bit, c bit) = (k >> 2, k >> 1, k) & 1
    if ((LUT >> k) & 1) r |= ((k & 4) ? a : ~a) & ((k & 2) ? b : ~b) & ((k & 1) ? c : ~c);
  }
  return r;
#else
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c), "n"(static_cast<int>(LUT)));
  return r;
#endif
}

// Byte permute, default mode: bytes {b, a} = b7..b4 a3..a0 (a = bytes 0-3); result byte i from selector nibble i
// (bits 4i..4i+3): bits 0-2 pick the byte, bit 3 set replaces it by its sign bit replicated (0x00 / 0xff).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
#if defined(SPQR_SHIM)
  const uint64_t bytes = static_cast<uint64_t>(b) << 32 | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t nib = (selector >> (4 * i)) & 0xfu;
    uint32_t byte = static_cast<uint32_t>(bytes >> (8 * (nib & 7u))) & 0xffu;
    if (nib & 8u) byte = (byte & 0x80u) ? 0xffu : 0x00u;
    r |= byte << (8 * i);
  }
  return r;
#else
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
  return r;
#endif
}

#undef SPQR_PTX_LOC

}  // namespace spqr_ptx

// The contract's names at global scope too (kernels call them unqualified).
using spqr_ptx::cp_async_16;
using spqr_ptx::cp_async_16_at;
using spqr_ptx::cp_async_4;
using spqr_ptx::cp_async_8;
using spqr_ptx::cp_async_commit;
using spqr_ptx::cp_async_wait;
using spqr_ptx::ldmatrix_x2;
using spqr_ptx::ldmatrix_x4;
using spqr_ptx::ldmatrix_x4_at;
using spqr_ptx::ldmatrix_x4_trans;
using spqr_ptx::lop3;
using spqr_ptx::mma_m16n8k16_f16f32;
using spqr_ptx::prmt;
using spqr_ptx::smem_addr;
using spqr_ptx::SmemAddr;
