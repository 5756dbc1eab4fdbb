// Self-test kernels of the CUDA execution shim (tests/test_cuda_shim.py): each one either computes something
// checkable or commits one fault the shim must diagnose. CUDA source, compiled only by the shim (g++).
#include <cstring>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../spqr_matmul.h"  // SPQR_LAUNCH

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

// Reads shared memory nobody wrote: the shim poisons it with NaN.
__global__ void read_unwritten_shared(const float* in, float* out) {
  __shared__ float scratch[64];
  if (in[0] < -1.0f) scratch[0] = 0.0f;  // never true: keeps g++ from folding the never-written array to zeros
  out[threadIdx.x] = scratch[threadIdx.x];
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
      {"read_unwritten_shared", read_unwritten_shared, 1, 64},
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
