// Self-test kernels of the CUDA execution shim (tests/test_cuda_shim.py): each one either computes something
// checkable or commits one fault the shim must diagnose. CUDA source, compiled only by the shim (g++).
#include <cstring>
#include <utility>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../spqr_matmul.h"
#include "../spqr_ptx.cuh"

namespace {

// out[b] = sum of in[256 b .. 256 b + 255]: warp shuffles, then warps through shared memory.
__global__ void block_sum(const float* in, float* out) {
  __shared__ float warp_sums[8];
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < 8; ++w) s += warp_sums[w];
    out[blockIdx.x] = s;
  }
}

// Same without the barrier: thread 0 reads warp sums other warps have not written yet.
__global__ void block_sum_no_barrier(const float* in, float* out) {
  __shared__ float warp_sums[8];
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < 8; ++w) s += warp_sums[w];
    out[blockIdx.x] = s;
  }
}

// out[t] = shuffles of every kind, for checking their lane arithmetic: lane l holds in[l].
__global__ void shuffles(const float* in, float* out) {
  const int l = threadIdx.x;
  const float v = in[l];
  out[0 * 32 + l] = __shfl_sync(0xffffffffu, v, 5);
  out[1 * 32 + l] = __shfl_up_sync(0xffffffffu, v, 3);
  out[2 * 32 + l] = __shfl_down_sync(0xffffffffu, v, 3);
  out[3 * 32 + l] = __shfl_xor_sync(0xffffffffu, v, 6);
  out[4 * 32 + l] = __shfl_xor_sync(0xffffffffu, v, 1, 8);
  out[5 * 32 + l] = __shfl_down_sync(0xffffffffu, v, 2, 8);
  out[6 * 32 + l] = static_cast<float>(__ballot_sync(0xffffffffu, v > 15.5f) >> 16);
  out[7 * 32 + l] = static_cast<float>(__any_sync(0xffffffffu, v > 30.5f) + 2 * __all_sync(0xffffffffu, v >= 0));
}

// Each thread records a global ticket when it starts (a plain counter: fibers never run concurrently).
int g_ticket = 0;
__global__ void start_order(const float*, float* out) { out[g_ticket++] = static_cast<float>(threadIdx.x); }

// Reads shared memory nobody wrote: the shim poisons it with NaN. A template, like the SpQR kernels: every
// instantiation has its own array, each must be found and poisoned.
template <int N>
__global__ void read_unwritten_shared(const float* in, float* out) {
  __shared__ float scratch[64 * N];
  if (in[0] < -1.0f) scratch[0] = 0.0f;  // never true: keeps g++ from folding the never-written array to zeros
  out[threadIdx.x] = scratch[N * threadIdx.x + N - 1];
}

// Faults the shim must diagnose.
__global__ void barrier_in_divergent_code(const float*, float* out) {
  if (threadIdx.x < 16) __syncthreads();  // threads 16.. exit while 0..15 wait
  out[threadIdx.x] = 1.0f;
}

__global__ void barrier_after_exit(const float*, float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void two_different_barriers(const float*, float* out) {
  if (threadIdx.x & 1) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_in_divergent_code(const float* in, float* out) {
  float v = in[threadIdx.x];
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void shuffle_then_barrier_deadlock(const float* in, float* out) {
  float v = in[threadIdx.x];
  if (threadIdx.x != 31) v = __shfl_xor_sync(0xffffffffu, v, 1);  // lane 31 goes on to the barrier
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void shuffle_mask_without_caller(const float* in, float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, in[threadIdx.x], 1);  // lanes 16..31 are not in the mask
}

__global__ void shuffle_reads_outside_mask(const float* in, float* out) {
  float v = in[threadIdx.x];
  if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);  // lane l reads lane l + 16: not in the mask
  out[threadIdx.x] = v;
}

__global__ void misaligned_ldg(const float* in, float* out) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(in + 1));
  out[threadIdx.x] = v.x;
}

__global__ void read_past_end(const float* in, float* out) {
  out[threadIdx.x] = in[threadIdx.x + 1];  // the last thread reads one element past the end
}

__global__ void write_into_input(const float* in, float* out) {
  const_cast<float*>(in)[threadIdx.x] = 0.0f;
  out[threadIdx.x] = 1.0f;
}

// Two threads of a block write the same shared word, unordered (for the ThreadSanitizer build).
__global__ void shared_race(const float*, float* out) {
  __shared__ float cell;
  if (threadIdx.x < 2) cell = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = cell;
}

// A shuffle whose source lane differs between lanes: lane l reads lane (7 l + 3) % 32.
__global__ void shuffle_per_lane_source(const float* in, float* out) {
  const int l = threadIdx.x;
  out[l] = __shfl_sync(0xffffffffu, in[l], (7 * l + 3) % 32);
  out[32 + l] = __shfl_xor_sync(0xffffffffu, in[l], l & 7);  // a lane mask that differs between lanes
}

// ---- PTX primitives (kernels/spqr_ptx.cuh). Registers travel as raw bits in the float buffers. -------------
__device__ uint32_t bits_at(const float* p, int i) {
  uint32_t v;
  std::memcpy(&v, p + i, 4);
  return v;
}
__device__ void store_bits(float* p, int i, uint32_t v) { std::memcpy(p + i, &v, 4); }

// Thread T (any warp) posts a = in[10 T .. +3], b = in[10 T + 4, +5], c = in[10 T + 6 .. +9] (f16x2 / f32 bits);
// out[4 T .. +3] = d.
__global__ void ptx_mma(const float* in, float* out) {
  const int t = threadIdx.x;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) a[i] = bits_at(in, 10 * t + i);
  for (int i = 0; i < 2; ++i) b[i] = bits_at(in, 10 * t + 4 + i);
  for (int i = 0; i < 4; ++i) c[i] = in[10 * t + 6 + i];
  mma_m16n8k16_f16f32(d, a, b, c);
  for (int i = 0; i < 4; ++i) out[4 * t + i] = d[i];
}

// Shared memory: 32 rows of 16 bytes = in[0 .. 128) (bits); lane i's row address: row in[128 + i] (a float).
// out[4 L + j] = ldmatrix_x4, out[128 + 2 L + j] = ldmatrix_x2, out[192 + 4 L + j] = ldmatrix_x4_trans.
__global__ void ptx_ldmatrix(const float* in, float* out) {
  __shared__ uint32_t rows[32 * 4];
  const int l = threadIdx.x;
  for (int i = 0; i < 4; ++i) rows[4 * l + i] = bits_at(in, 4 * l + i);
  __syncthreads();
  const uint32_t* row = &rows[4 * static_cast<int>(in[128 + l])];
  uint32_t r4[4], r2[2], rt[4];
  ldmatrix_x4(r4, row);
  ldmatrix_x2(r2, row);
  ldmatrix_x4_trans(rt, row);
  for (int j = 0; j < 4; ++j) store_bits(out, 4 * l + j, r4[j]);
  for (int j = 0; j < 2; ++j) store_bits(out, 128 + 2 * l + j, r2[j]);
  for (int j = 0; j < 4; ++j) store_bits(out, 192 + 4 * l + j, rt[j]);
}

// cp.async of in[0 .. 448) into shared memory, 64 threads: thread T copies words 4T..4T+3 (16 B), 256 + 2T,
// +1 (8 B) and 384 + T (4 B), commits, waits as `Mode` says, then out[i] = the shared copy of word i (read by
// other threads after a barrier). Mode 0: wait_group 0; 1: no wait; 2: two groups (the 16-B copies, then the
// others), wait_group 1 (only the first group has landed).
template <int Mode>
__global__ void ptx_cp_async(const float* in, float* out) {
  __shared__ float buf[448];
  const int t = threadIdx.x;
  cp_async_16(&buf[4 * t], &in[4 * t]);
  if (Mode == 2) cp_async_commit();
  cp_async_8(&buf[256 + 2 * t], &in[256 + 2 * t]);
  cp_async_4(&buf[384 + t], &in[384 + t]);
  cp_async_commit();
  if (Mode == 0) cp_async_wait<0>();
  if (Mode == 2) cp_async_wait<1>();
  __syncthreads();
  for (int i = t; i < 448; i += 64) out[i] = buf[i];
}

// Every lop3 LUT on lane L's words a = in[3L], b = in[3L + 1], c = in[3L + 2]: out[32 LUT + L].
template <int... L>
__device__ void lop3_all(uint32_t a, uint32_t b, uint32_t c, float* out, int lane, std::integer_sequence<int, L...>) {
  (store_bits(out, 32 * L + lane, lop3<static_cast<uint8_t>(L)>(a, b, c)), ...);
}
__global__ void ptx_lop3(const float* in, float* out) {
  const int l = threadIdx.x;
  lop3_all(bits_at(in, 3 * l), bits_at(in, 3 * l + 1), bits_at(in, 3 * l + 2), out, l,
           std::make_integer_sequence<int, 256>());
}

// out[L] = prmt(a = in[3L], b = in[3L + 1], selector = in[3L + 2]).
__global__ void ptx_prmt(const float* in, float* out) {
  const int l = threadIdx.x;
  store_bits(out, l, prmt(bits_at(in, 3 * l), bits_at(in, 3 * l + 1), bits_at(in, 3 * l + 2)));
}

// Faults of the primitives.
__global__ void mma_in_divergent_code(const float* in, float* out) {
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {in[0], 0, 0, 0}, d[4] = {};
  if (threadIdx.x < 16) mma_m16n8k16_f16f32(d, a, b, c);  // lanes 16..31 exit: the mma waits for them
  out[threadIdx.x] = d[0];
}

__global__ void mma_at_two_places(const float* in, float* out) {
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {in[0], 0, 0, 0}, d[4] = {};
  if (threadIdx.x & 1) {
    mma_m16n8k16_f16f32(d, a, b, c);
  } else {
    mma_m16n8k16_f16f32(d, a, b, c);
  }
  out[threadIdx.x] = d[0];
}

__global__ void ldmatrix_misaligned(const float* in, float* out) {
  __shared__ uint32_t rows[32 * 4 + 1];
  rows[threadIdx.x] = bits_at(in, threadIdx.x);
  __syncthreads();
  uint32_t r[4];
  ldmatrix_x4(r, &rows[4 * threadIdx.x + 1]);  // 4 bytes past a 16-byte boundary
  store_bits(out, threadIdx.x, r[0]);
}

__global__ void ldmatrix_from_global(const float* in, float* out) {
  uint32_t r[2];
  ldmatrix_x2(r, in + 4 * (threadIdx.x & 15));  // not shared memory
  store_bits(out, threadIdx.x, r[0]);
}

__global__ void cp_async_misaligned(const float* in, float* out) {
  __shared__ float buf[4 * 32];
  cp_async_16(&buf[4 * threadIdx.x], &in[4 * threadIdx.x + 2]);  // source 8 bytes past a 16-byte boundary
  cp_async_commit();
  cp_async_wait<0>();
  out[threadIdx.x] = buf[4 * threadIdx.x];
}

__global__ void cp_async_into_global(const float* in, float* out) {
  cp_async_4(&out[threadIdx.x], &in[threadIdx.x]);  // the destination must be shared memory
  cp_async_commit();
  cp_async_wait<0>();
}

}  // namespace

extern "C" int cuda_shim_selftest_launch(const char* name, const float* in, size_t n_in, float* out, size_t n_out) {
  (void)n_in;
  (void)n_out;
  struct Entry {
    const char* name;
    void (*kernel)(const float*, float*);
    int grid, block;
  };
  static const Entry entries[] = {
      {"block_sum", block_sum, 4, 256},
      {"block_sum_no_barrier", block_sum_no_barrier, 4, 256},
      {"shuffles", shuffles, 1, 32},
      {"start_order", start_order, 1, 64},
      {"read_unwritten_shared", read_unwritten_shared<1>, 1, 64},
      {"read_unwritten_shared_2", read_unwritten_shared<2>, 1, 64},
      {"read_unwritten_shared_3", read_unwritten_shared<3>, 1, 64},
      {"barrier_in_divergent_code", barrier_in_divergent_code, 1, 64},
      {"barrier_after_exit", barrier_after_exit, 1, 64},
      {"two_different_barriers", two_different_barriers, 1, 64},
      {"shuffle_in_divergent_code", shuffle_in_divergent_code, 1, 32},
      {"shuffle_then_barrier_deadlock", shuffle_then_barrier_deadlock, 1, 64},
      {"shuffle_mask_without_caller", shuffle_mask_without_caller, 1, 32},
      {"shuffle_reads_outside_mask", shuffle_reads_outside_mask, 1, 32},
      {"misaligned_ldg", misaligned_ldg, 1, 32},
      {"read_past_end", read_past_end, 1, 32},
      {"write_into_input", write_into_input, 1, 32},
      {"shared_race", shared_race, 1, 64},
      {"shuffle_per_lane_source", shuffle_per_lane_source, 1, 32},
      {"ptx_mma", ptx_mma, 1, 64},
      {"ptx_ldmatrix", ptx_ldmatrix, 1, 32},
      {"ptx_cp_async_wait", ptx_cp_async<0>, 1, 64},
      {"ptx_cp_async_no_wait", ptx_cp_async<1>, 1, 64},
      {"ptx_cp_async_two_groups", ptx_cp_async<2>, 1, 64},
      {"ptx_lop3", ptx_lop3, 1, 32},
      {"ptx_prmt", ptx_prmt, 1, 32},
      {"mma_in_divergent_code", mma_in_divergent_code, 1, 32},
      {"mma_at_two_places", mma_at_two_places, 1, 32},
      {"ldmatrix_misaligned", ldmatrix_misaligned, 1, 32},
      {"ldmatrix_from_global", ldmatrix_from_global, 1, 32},
      {"cp_async_misaligned", cp_async_misaligned, 1, 32},
      {"cp_async_into_global", cp_async_into_global, 1, 32},
  };
  g_ticket = 0;
  for (const Entry& e : entries) {
    if (std::strcmp(e.name, name) == 0) {
      SPQR_LAUNCH(e.grid, e.block, 0, nullptr, e.kernel)(in, out);
      return 0;
    }
  }
  return -1;
}
