// C API of the CUDA execution shim library (loaded by kernels/testing/shim.py with ctypes): runs the launchers
// of kernels/spqr_matmul.h on host memory.
//
// Every buffer a kernel sees is a fresh copy placed so that it ends exactly at a PROT_NONE guard page (an
// "electric fence"): a read one element past the end faults, and the fault is reported with the buffer's name
// instead of silently reading a neighbour. Inputs are read-only (a write into one faults too). The output is
// filled with 0xff bytes (fp16 NaN) before the launch, so an element the kernel does not write stays NaN.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "../spqr_matmul.h"
#include "shim_runtime.h"

namespace {

struct Fence {
  const char* name = "";
  char* map = nullptr;  // whole mapping: data pages then one guard page
  size_t map_bytes = 0;
  char* data = nullptr;  // the buffer: data + bytes == guard page
  size_t bytes = 0;
};

std::vector<Fence> g_fences;  // buffers of the current call, for fault messages

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

// A copy of `src` (or `bytes` bytes of `fill` when src is null) ending at a guard page; read-only if asked.
// `bytes` must be a multiple of the alignment the kernels need (true for every SpQR buffer: 16-byte tiles).
char* fenced(const char* name, const void* src, size_t bytes, int fill, bool read_only) {
  const size_t page = page_size();
  const size_t data_pages = (bytes + page - 1) / page + 1;  // at least one page before the fence
  Fence f;
  f.name = name;
  f.map_bytes = (data_pages + 1) * page;
  void* m = mmap(nullptr, f.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  f.map = static_cast<char*>(m);
  char* guard = f.map + data_pages * page;
  mprotect(guard, page, PROT_NONE);
  f.data = guard - bytes;
  f.bytes = bytes;
  if (src != nullptr) {
    std::memcpy(f.data, src, bytes);
  } else {
    std::memset(f.data, fill, bytes);
  }
  if (read_only) mprotect(f.map, data_pages * page, PROT_READ);
  g_fences.push_back(f);
  return f.data;
}

void release_fences() {
  for (const Fence& f : g_fences) munmap(f.map, f.map_bytes);
  g_fences.clear();
}

std::string describe(const void* addr) {
  const auto a = reinterpret_cast<const char*>(addr);
  const size_t page = page_size();
  for (const Fence& f : g_fences) {
    const char* end = f.data + f.bytes;
    if (a >= end && a < end + page) {
      return std::string("read past the end of '") + f.name + "' (" + std::to_string(f.bytes) + " bytes), " +
             std::to_string(a - end) + " bytes beyond it";
    }
    if (a >= f.data && a < end) return std::string("a write into the read-only input '") + f.name + "'";
    if (a >= f.map && a < f.data) {
      return std::string("before the start of '") + f.name + "', " + std::to_string(f.data - a) + " bytes";
    }
  }
  return "";
}

struct CallGuard {
  CallGuard() {
    cuda_shim::clear_last_error();
    cuda_shim::set_address_describer(&describe);
  }
  ~CallGuard() {
    cuda_shim::set_address_describer(nullptr);
    release_fences();
  }
};

std::string g_api_error;

int report(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return 0;
  g_api_error = cuda_shim::last_error_text();
  if (g_api_error.empty()) g_api_error = std::string(what) + " returned CUDA error " + std::to_string(int(e));
  return static_cast<int>(e);
}

}  // namespace

extern "C" {

// order: 0 forward, 1 reverse, 2 random (seeded); applies to the next launches.
void cuda_shim_configure(int order, unsigned long long seed) {
  cuda_shim::configure({static_cast<cuda_shim::Order>(order), seed});
}

// Bytes of shared memory (all kernels' __shared__ variables) the shim poisons before each block.
size_t cuda_shim_shared_bytes() { return cuda_shim::shared_memory_bytes(); }

// The message of the last failed call.
const char* cuda_shim_last_error() { return g_api_error.c_str(); }

// Which build this library is: "plain", "asan" or "tsan".
const char* cuda_shim_build() {
#if defined(SHIM_TSAN)
  return "tsan";
#elif defined(__SANITIZE_ADDRESS__)
  return "asan";
#else
  return "plain";
#endif
}

// One SpQR kernel call. op: 1 spqr_matmul_small, 2 spqr_dequantize.
// ints (9): wbits, stat_bits, out_features, in_features, rows, bias_kind (0 none, 1 fp16, 2 fp32), splits (0: the
// launcher's plan for num_sms SMs), num_sms, ldx (the row stride of x in halves).
// buffers/bytes (5): tiles, outliers, outlier_row_ptr, x (stored column order), bias; a null pointer is an
// absent buffer. The split-K workspace is fenced and poisoned (NaN), the ticket counters fenced and zeroed; after
// the call every counter must be zero again (the launcher's contract for reusing them).
// out/out_bytes: where the kernel's output is copied. Returns 0, or a CUDA error code with
// cuda_shim_last_error() set.
int spqr_shim_call(int op, const int* ints, const void* const* buffers, const size_t* bytes, void* out,
                   size_t out_bytes) {
  const CallGuard guard;
  static const char* const names[5] = {"tiles", "outliers", "outlier_row_ptr", "x", "bias"};
  const void* dev[5] = {};
  for (int i = 0; i < 5; ++i) {
    if (buffers[i] != nullptr) dev[i] = fenced(names[i], buffers[i], bytes[i], 0, /*read_only=*/true);
  }
  char* y = fenced("output", nullptr, out_bytes, 0xff, /*read_only=*/false);
  SpqrLayer layer;
  layer.tiles = static_cast<const int32_t*>(dev[0]);
  layer.outliers = static_cast<const int32_t*>(dev[1]);
  layer.outlier_row_ptr = static_cast<const int32_t*>(dev[2]);
  layer.wbits = ints[0];
  layer.stat_bits = ints[1];
  layer.out_features = ints[2];
  layer.in_features = ints[3];
  const int rows = ints[4];
  SpqrBias bias{nullptr, nullptr};
  if (ints[5] == 1) bias.f16 = static_cast<const __half*>(dev[4]);
  if (ints[5] == 2) bias.f32 = static_cast<const float*>(dev[4]);
  const auto* x = static_cast<const __half*>(dev[3]);
  auto* yh = reinterpret_cast<__half*>(y);
  cudaError_t e = cudaErrorInvalidValue;
  const char* what = "unknown op";
  if (op == 1) {
    what = "spqr_matmul_small";
    SpqrSmallPlan plan = spqr_matmul_small_plan(layer, ints[7], spqr_matmul_small_blocks_per_sm(
                                                                     layer.wbits, layer.stat_bits, rows));
    if (ints[6] > 0) {  // a forced split count: the workspace for it
      plan.splits = ints[6];
      plan.counters = (layer.out_features + 63) / 64;
      plan.workspace_floats = static_cast<size_t>(plan.counters) * plan.splits * 4 * 32 * 8;
    }
    float* ws = plan.workspace_floats == 0
                    ? nullptr
                    : reinterpret_cast<float*>(
                          fenced("workspace", nullptr, plan.workspace_floats * sizeof(float), 0xff, false));
    int* counters = plan.counters == 0 ? nullptr
                                       : reinterpret_cast<int*>(
                                             fenced("counters", nullptr, plan.counters * sizeof(int), 0, false));
    e = spqr_matmul_small(layer, x, ints[8], rows, bias, yh, plan, ws, counters, nullptr);
    for (int i = 0; e == cudaSuccess && i < plan.counters; ++i) {
      if (counters[i] != 0) {
        g_api_error = "spqr_matmul_small left ticket counter " + std::to_string(i) + " at " +
                      std::to_string(counters[i]) + " (must be reset to 0)";
        return static_cast<int>(cudaErrorLaunchFailure);
      }
    }
  } else if (op == 2) {
    what = "spqr_dequantize";
    e = spqr_dequantize(layer, yh, nullptr);
  }
  if (e == cudaSuccess) std::memcpy(out, y, out_bytes);
  return report(e, what);
}

// Runs the self-test kernel `name` (shim_selftest.cu) on `in` (n_in floats) into `out` (n_out floats).
int cuda_shim_selftest_launch(const char* name, const float* in, size_t n_in, float* out, size_t n_out);

int cuda_shim_selftest(const char* name, const float* in, size_t n_in, float* out, size_t n_out) {
  const CallGuard guard;
  const auto* din = reinterpret_cast<const float*>(fenced("in", in, n_in * sizeof(float), 0, true));
  auto* dout = reinterpret_cast<float*>(fenced("out", nullptr, n_out * sizeof(float), 0xff, false));
  const int rc = cuda_shim_selftest_launch(name, din, n_in, dout, n_out);
  if (rc < 0) {
    g_api_error = std::string("no self-test kernel named ") + name;
    return rc;
  }
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) std::memcpy(out, dout, n_out * sizeof(float));
  return report(e, name);
}

}  // extern "C"
