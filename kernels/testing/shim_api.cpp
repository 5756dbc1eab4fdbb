// C API of the CUDA execution shim library (loaded by kernels/testing/shim.py with ctypes): the SpQR kernel
// instances by index with cuLaunchKernel-shaped arguments, fenced host memory for their buffers, the self-test
// kernels.
//
// Every buffer a kernel sees is allocated here (cuda_shim_alloc) so that it ends exactly at a PROT_NONE guard
// page (an "electric fence"): a read one element past the end faults, and the fault is reported with the
// buffer's name instead of silently reading a neighbour. Inputs are read-only (a write into one faults too).
// Outputs and workspaces are filled with 0xff bytes (fp16/fp32 NaN), so an element the kernel does not write
// stays NaN.
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include <cuda_runtime.h>

#include "shim_runtime.h"

// The kernel instances (the table shim.py generates beside the kernel source).
extern "C" size_t cuda_shim_kernel_entries(const cuda_shim::KernelEntry** out);

namespace {

struct Fence {
  std::string name;
  char* map = nullptr;  // whole mapping: data pages then one guard page
  size_t map_bytes = 0;
  char* data = nullptr;  // the buffer: data + bytes == guard page
  size_t bytes = 0;
};

std::vector<Fence> g_fences;  // live buffers, for fault messages

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
  ~CallGuard() { cuda_shim::set_address_describer(nullptr); }
};

std::string g_api_error;

int report(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return 0;
  g_api_error = cuda_shim::last_error_text();
  if (g_api_error.empty()) g_api_error = std::string(what) + " returned CUDA error " + std::to_string(int(e));
  return static_cast<int>(e);
}

const cuda_shim::KernelEntry* entry(int i) {
  const cuda_shim::KernelEntry* entries = nullptr;
  const size_t n = cuda_shim_kernel_entries(&entries);
  return i >= 0 && static_cast<size_t>(i) < n ? &entries[i] : nullptr;
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

// The kernel instances: how many, and instance i's C++ name and symbol (this compiler's mangling, from the
// dynamic symbol table; "" when not found).
int cuda_shim_kernel_count() {
  const cuda_shim::KernelEntry* entries = nullptr;
  return static_cast<int>(cuda_shim_kernel_entries(&entries));
}
const char* cuda_shim_kernel_expr(int i) { return entry(i) != nullptr ? entry(i)->expr : ""; }
const char* cuda_shim_kernel_symbol(int i) {
  Dl_info info{};
  if (entry(i) == nullptr || dladdr(entry(i)->address, &info) == 0 || info.dli_sname == nullptr) return "";
  return info.dli_saddr == entry(i)->address ? info.dli_sname : "";
}

// cuLaunchKernel of instance `kernel`: grid, block, dynamic shared memory (must be 0) and `params` (one pointer
// to each argument's value). Runs the grid to completion; returns 0, or a CUDA error code with
// cuda_shim_last_error() set (a diagnosed fault, an invalid configuration).
int cuda_shim_launch(int kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                     unsigned smem, void* const* params) {
  const CallGuard guard;
  const cuda_shim::KernelEntry* e = entry(kernel);
  if (e == nullptr) {
    g_api_error = "cuda_shim_launch: no kernel instance " + std::to_string(kernel);
    return static_cast<int>(cudaErrorInvalidValue);
  }
  e->launch(dim3(gx, gy, gz), dim3(bx, by, bz), smem, params, e->expr);
  return report(cudaGetLastError(), e->expr);
}

// A fenced buffer of `bytes` bytes: a copy of `src`, or `fill` bytes when src is null; read-only if asked.
// Null when it cannot be mapped. Lives until cuda_shim_free_all.
void* cuda_shim_alloc(const char* name, const void* src, size_t bytes, int fill, int read_only) {
  return fenced(name, src, bytes, fill, read_only != 0);
}

// Unmaps every fenced buffer.
void cuda_shim_free_all() { release_fences(); }

// Runs the self-test kernel `name` (shim_selftest.cu) on `in` (n_in floats) into `out` (n_out floats).
int cuda_shim_selftest_launch(const char* name, const float* in, size_t n_in, float* out, size_t n_out);

int cuda_shim_selftest(const char* name, const float* in, size_t n_in, float* out, size_t n_out) {
  const CallGuard guard;
  const size_t mark = g_fences.size();
  const auto* din = reinterpret_cast<const float*>(fenced("in", in, n_in * sizeof(float), 0, true));
  auto* dout = reinterpret_cast<float*>(fenced("out", nullptr, n_out * sizeof(float), 0xff, false));
  const int rc = cuda_shim_selftest_launch(name, din, n_in, dout, n_out);
  int result = rc;
  if (rc < 0) {
    g_api_error = std::string("no self-test kernel named ") + name;
  } else {
    const cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) std::memcpy(out, dout, n_out * sizeof(float));
    result = report(e, name);
  }
  for (size_t i = mark; i < g_fences.size(); ++i) munmap(g_fences[i].map, g_fences[i].map_bytes);
  g_fences.resize(mark);
  return result;
}

}  // extern "C"
