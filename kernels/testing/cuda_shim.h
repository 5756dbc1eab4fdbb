// CUDA execution shim: the prelude that lets g++ compile kernels/*.cu as C++ and run them on the CPU.
//
// Force-included (g++ -include cuda_shim.h) before every kernel source; kernels/testing/include/ shadows
// <cuda_runtime.h>. Each CUDA thread of a launch runs as a fiber (kernels/testing/shim_runtime.cpp), the blocks
// of a grid one after another; __syncthreads, __syncwarp and the warp collectives (__shfl_*_sync, __ballot_sync,
// __any_sync, __all_sync) are the switch points, so a missing barrier reads another thread's stale data or the
// poisoned shared memory and shows up as a wrong result. fp16 (__half, __half2 and their conversions) and the
// vector types come from the CUDA toolkit's own cuda_fp16.h / vector_types.h, which have host implementations.
//
// Diagnostics (with the kernel's file:line, via std::source_location default arguments): deadlock, a barrier
// that some threads of the block never reach or reach after others exited, two barriers at different lines,
// a warp collective whose mask names a lane that is elsewhere or exited (a shuffle in divergent code), a mask
// without the calling lane, a shuffle reading a lane outside its mask, a misaligned __ldg; for the PTX
// primitives of kernels/spqr_ptx.cuh: mma / ldmatrix with less than the full warp (a partial mask, or in
// divergent code), a misaligned ldmatrix row or cp.async source / destination, an ldmatrix row or a cp.async
// destination outside shared memory. Plain loads and stores through vector pointers are checked for alignment
// by UndefinedBehaviorSanitizer in the asan build.
//
// Adding an intrinsic: an inline function in namespace-less scope below; anything that communicates between
// threads must go through cuda_shim::collective() or cuda_shim::barrier() (shim_runtime.cpp) so it is a switch
// point. Kernels v2 primitives go behind named device functions the same way:
//   - mma.sync / ldmatrix are warp collectives (collective_wide: 16 words a lane each way): each lane posts its
//     fragment registers (or its row address for ldmatrix) and, when the mask is complete, the last lane
//     computes every lane's result from the PTX ISA fragment layout (kernels/spqr_ptx.cuh).
//   - cp.async: the copy happens at cp.async.wait_group time rather than at issue (async_copy / async_wait),
//     and the destination is poisoned at issue, so a missing wait reads the poisoned destination, as a
//     missing barrier does.
#pragma once

// Kernel sources test this to pick the shim's implementation of a primitive (kernels/spqr_ptx.cuh).
#define SPQR_SHIM 1

#include <math.h>  // fmaf and friends, in the global namespace as in CUDA

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers (defined before the toolkit headers, which keep definitions that already exist) ---------
#define __host__
#define __device__
#define __global__
#define __noinline__ __attribute__((noinline))
// Every __shared__ variable is a function-local static: one copy, seen by all threads of the running block. The
// runtime finds them all in the library's symbol table and poisons them (0xff bytes: NaN) before each block.
#define __shared__ static __attribute__((aligned(16)))
#define __constant__ static const

#include <cuda_fp16.h>  // the toolkit's: __half, __half2, conversions; vector_types.h, vector_functions.h

#undef __launch_bounds__
#define __launch_bounds__(...)

namespace cuda_shim {

using Loc = std::source_location;

// Kinds of warp collective (shim_runtime.cpp resolves them when every lane of the mask has arrived).
// Mma: mma.sync.m16n8k16 f16 x f16 + f32 (value: a0..a3, b0, b1, c0..c3; result: d0..d3).
// Gather: each lane receives the 64-bit payloads (value words 0, 1) of up to 8 source lanes it names in value
// words 2..9 (0xffffffff: none), in result words 2k, 2k + 1 (ldmatrix: the row addresses a lane reads).
enum class Coll : int { Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp, Mma, Gather };

// The value one lane posts to (or receives from) a wide collective.
constexpr int kWideWords = 16;
struct Wide {
  uint32_t w[kWideWords];
};

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Blocks until every thread of the block arrives; diagnoses divergence and exits.
void barrier(const Loc& loc);
// One lane's part in a warp collective: returns the value the lane receives (the raw bits of `value` of the
// source lane for shuffles; the mask result for votes).
uint64_t collective(Coll kind, unsigned mask, uint64_t value, int arg, int width, const char* name, const Loc& loc);
// The same with 16 words a lane each way (Mma, Gather; the others use words 0 and 1).
Wide collective_wide(Coll kind, unsigned mask, const Wide& value, int arg, int width, const char* name,
                     const Loc& loc);
// Whether [p, p + bytes) lies inside one __shared__ variable of the running kernels.
bool is_shared(const void* p, size_t bytes);
// cp.async of the calling thread: async_copy queues a copy (the caller poisons the destination), async_commit
// closes the current group, async_next hands back (and removes) the oldest queued copy of a committed group
// older than the `pending` most recent committed groups (false when none is left): cp.async.wait_group.
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes;
};
void async_copy(void* dst, const void* src, size_t bytes);
void async_commit();
bool async_next(int pending, AsyncCopy* copy);
// Reports a kernel fault (the launch fails with this message and the thread never resumes).
[[noreturn]] void fail(const Loc& loc, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void check_aligned(const void* p, size_t align, const char* what, const Loc& loc);

// Type-erased kernel body: every thread of the launch calls it.
struct Body {
  void (*call)(void* state);
  void* state;
};
void run_grid(dim3 grid, dim3 block, size_t dynamic_smem, Body body, const char* kernel, const Loc& loc);

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a large type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// launch(kernel, grid, block, smem, stream)(args...): CUDA passes kernel parameters by value, converted to
// the parameter types; every thread gets its own copy of them.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  const char* name;
  Loc loc;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    struct State {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...> params;
    } state{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    Body body{[](void* s) {
                auto* st = static_cast<State*>(s);
                auto copy = st->params;  // by value, per thread
                std::apply(st->kernel, copy);
              },
              &state};
    run_grid(grid, block, smem, body, name, loc);
  }
};

// cuLaunchKernel's way: the argument values behind `params` (one pointer each, in parameter order, as the
// Python launcher's argument block lays them out), copied into the kernel's parameter types.
template <typename... Params, size_t... I>
void launch_params_impl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, void* const* params,
                        const char* name, std::index_sequence<I...>) {
  Launch<Params...>{kernel, grid, block, smem, name, Loc::current()}(
      *static_cast<const std::decay_t<Params>*>(params[I])...);
}
template <typename... Params>
constexpr size_t arity_of(void (*)(Params...)) {
  return sizeof...(Params);
}
template <auto Kernel>
void launch_params(dim3 grid, dim3 block, size_t smem, void* const* params, const char* name) {
  launch_params_impl(Kernel, grid, block, smem, params, name, std::make_index_sequence<arity_of(Kernel)>{});
}

// One kernel instance the shim launches by index (shim_api.cpp, cuda_shim_launch): its C++ name
// ("spqr::spqr_matmul_small_kernel<3, 3, 1>"), launcher and address (for its symbol). The table is generated by
// kernels/testing/shim.py (one translation unit that includes the kernel source).
struct KernelEntry {
  const char* expr;
  void (*launch)(dim3 grid, dim3 block, size_t smem, void* const* params, const char* name);
  const void* address;
};

// "kernel<W, SB> [with int W = 3; int SB = 2]" from the launch's text and the launching function's signature.
const char* kernel_name(const char* written, const char* launcher);

template <typename... Params>
Launch<Params...> make_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, void* /*stream*/,
                              const char* name, Loc loc = Loc::current()) {
  return Launch<Params...>{kernel, grid, block, smem, name, loc};
}

}  // namespace cuda_shim

// The launch macro of the shim's self-test kernels (shim_selftest.cu); the SpQR kernels are launched by index.
// The kernel's name in diagnostics: its template-id as written plus the launching function's template arguments.
#define SPQR_LAUNCH(grid, block, smem, stream, ...)                                                         \
  ::cuda_shim::make_launch(__VA_ARGS__, dim3(grid), dim3(block), (smem), (stream),                             \
                           ::cuda_shim::kernel_name(#__VA_ARGS__, __PRETTY_FUNCTION__))

// ---- built-in variables ---------------------------------------------------------------------------------
#define threadIdx (::cuda_shim::thread_idx())
#define blockIdx (::cuda_shim::block_idx())
#define blockDim (::cuda_shim::block_dim())
#define gridDim (::cuda_shim::grid_dim())
constexpr int warpSize = 32;

// ---- synchronisation and warp collectives ---------------------------------------------------------------
inline void __syncthreads(const cuda_shim::Loc& loc = cuda_shim::Loc::current()) { cuda_shim::barrier(loc); }

inline void __syncwarp(unsigned mask = 0xffffffffu, const cuda_shim::Loc& loc = cuda_shim::Loc::current()) {
  cuda_shim::collective(cuda_shim::Coll::SyncWarp, mask, 0, 0, 32, "__syncwarp", loc);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const cuda_shim::Loc& loc = cuda_shim::Loc::current()) {
  return cuda_shim::from_bits<T>(cuda_shim::collective(cuda_shim::Coll::Shfl, mask, cuda_shim::to_bits(var),
                                                       src_lane, width, "__shfl_sync", loc));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const cuda_shim::Loc& loc = cuda_shim::Loc::current()) {
  return cuda_shim::from_bits<T>(cuda_shim::collective(cuda_shim::Coll::ShflUp, mask, cuda_shim::to_bits(var),
                                                       static_cast<int>(delta), width, "__shfl_up_sync", loc));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const cuda_shim::Loc& loc = cuda_shim::Loc::current()) {
  return cuda_shim::from_bits<T>(cuda_shim::collective(cuda_shim::Coll::ShflDown, mask, cuda_shim::to_bits(var),
                                                       static_cast<int>(delta), width, "__shfl_down_sync", loc));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const cuda_shim::Loc& loc = cuda_shim::Loc::current()) {
  return cuda_shim::from_bits<T>(cuda_shim::collective(cuda_shim::Coll::ShflXor, mask, cuda_shim::to_bits(var),
                                                       lane_mask, width, "__shfl_xor_sync", loc));
}
inline unsigned __ballot_sync(unsigned mask, int pred, const cuda_shim::Loc& loc = cuda_shim::Loc::current()) {
  return static_cast<unsigned>(
      cuda_shim::collective(cuda_shim::Coll::Ballot, mask, pred != 0, 0, 32, "__ballot_sync", loc));
}
inline int __any_sync(unsigned mask, int pred, const cuda_shim::Loc& loc = cuda_shim::Loc::current()) {
  return static_cast<int>(cuda_shim::collective(cuda_shim::Coll::Any, mask, pred != 0, 0, 32, "__any_sync", loc));
}
inline int __all_sync(unsigned mask, int pred, const cuda_shim::Loc& loc = cuda_shim::Loc::current()) {
  return static_cast<int>(cuda_shim::collective(cuda_shim::Coll::All, mask, pred != 0, 0, 32, "__all_sync", loc));
}

// ---- loads ----------------------------------------------------------------------------------------------
// __ldg: a read-only global load; a vector type must be aligned to its size, as on the GPU (else: a fault).
template <typename T>
T __ldg(const T* p, const cuda_shim::Loc& loc = cuda_shim::Loc::current()) {
  cuda_shim::check_aligned(p, alignof(T), "__ldg", loc);
  return *p;
}

// ---- integer and float intrinsics -----------------------------------------------------------------------
inline float __uint_as_float(unsigned v) { return cuda_shim::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return static_cast<unsigned>(cuda_shim::to_bits(v)); }
inline float __int_as_float(int v) { return cuda_shim::from_bits<float>(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(cuda_shim::to_bits(v)); }

// funnel shifts: (hi:lo) as 64 bits; shift & 31 (wrap) or min(shift, 32) (clamp).
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>((((uint64_t)hi << 32) | lo) >> (shift & 31));
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>(((((uint64_t)hi << 32) | lo) << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>((((uint64_t)hi << 32) | lo) >> (shift < 32 ? shift : 32));
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>(((((uint64_t)hi << 32) | lo) << (shift < 32 ? shift : 32)) >> 32);
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = ((uint64_t)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((bytes >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}

// Correctly rounded single operations (the shim compiles with -ffp-contract=off, so nothing is fused
// unless written as fmaf, which the C library computes with one rounding like the GPU's FFMA).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return __builtin_fmaf(a, b, c); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
