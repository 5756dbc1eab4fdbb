// CUDA execution shim runtime (prelude: kernels/testing/cuda_shim.h): runs a grid on the CPU, one block after
// another, every thread of a block a fiber with its own stack. A fiber runs until it reaches a switch point
// (__syncthreads, a warp collective) or exits; the last thread to arrive at a barrier or collective releases
// the others. A scheduler pass visits the runnable fibers in the configured order (forward, reverse, or a
// seeded random permutation drawn anew each pass); a pass that finds none runnable while some have not
// exited is a deadlock.
//
// Sanitizers: under AddressSanitizer every switch is announced (__sanitizer_{start,finish}_switch_fiber);
// under ThreadSanitizer every fiber is a TSan fiber, switches carry no happens-before edge, and only
// __syncthreads / __syncwarp add one (release on arrival, acquire on departure), so unsynchronised shared
// memory accesses between threads of a block are reported. Blocks are ordered one after another (the end of
// block b happens before block b + 1: shared memory is reused between blocks). Under TSan this file itself is
// compiled without instrumentation, so the scheduler's bookkeeping is invisible to the race detector.
#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cuda_shim.h"
#include "include/cuda_runtime.h"
#include "shim_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SHIM_ASAN 1
#else
#define SHIM_ASAN 0
#endif
#if defined(SHIM_TSAN)
#include <sanitizer/tsan_interface.h>
#else
#define SHIM_TSAN 0
#endif


// ---- context switch -------------------------------------------------------------------------------------
// x86-64: save the callee-saved registers, MXCSR and the x87 control word on the current stack, store the stack
// pointer in *save, load `next`, restore and return into the other context (about 10 ns; glibc's swapcontext
// makes a sigprocmask system call each time and costs 100 times more).
#if defined(__x86_64__)
extern "C" void cuda_shim_switch(void** save, void* next);
asm(R"(
  .pushsection .text
  .globl cuda_shim_switch
  .hidden cuda_shim_switch
  .type cuda_shim_switch, @function
cuda_shim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_shim_switch, .-cuda_shim_switch
  .popsection
)");
#else
#include <ucontext.h>
#endif

namespace cuda_shim {
namespace {

constexpr int kWarp = 32;
#if SHIM_ASAN || SHIM_TSAN
constexpr size_t kStackBytes = 512 * 1024;  // sanitizers grow frames
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

enum class State : uint8_t { Runnable, Barrier, Coll, Done };

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  char* stack = nullptr;  // lowest usable byte
  uint3 tid{};
  int linear = 0, lane = 0, warp = 0;
  State state = State::Runnable;
  bool started = false;
  Loc where;  // barrier or collective being waited at
  Coll kind = Coll::Shfl;
  unsigned mask = 0;
  int arg = 0, width = 32;
  const char* name = "";
  Wide value{}, result{};
  // cp.async: queued copies with their group number; `open_group` is the number of the group being filled
  // (= the number of committed groups).
  std::deque<std::pair<long, AsyncCopy>> async_queue;
  long open_group = 0;
  void* tsan_fiber = nullptr;
  void* asan_fake = nullptr;
};

struct Grid {
  dim3 grid, block;
  uint3 bidx{};
  Body body{};
  const char* kernel = "";
  Loc launch_loc;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  size_t slot_bytes = 0;
  Fiber* current = nullptr;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  int done = 0;
  int arrived = 0;
  bool failed = false;
  std::string error;
  // Sanitizer bookkeeping: the scheduler's stack (for ASan) and fiber (for TSan), sync objects.
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* sched_tsan = nullptr;
  char* barrier_sync = nullptr;  // one per block: never shared across blocks
  char warp_sync[32] = {};
  char to_threads = 0;  // host -> every thread (acquired when a thread starts)
  char to_host = 0;     // every thread -> host (acquired at the end of each block); threads never acquire it
};

std::mutex g_launch_mutex;
Grid* g = nullptr;  // the running launch
Config g_config;
std::string g_last_error;
cudaError_t g_last_code = cudaSuccess;
AddressDescriber g_describe = nullptr;

// ---- sanitizer hooks ------------------------------------------------------------------------------------
void tsan_release([[maybe_unused]] void* addr) {
#if SHIM_TSAN
  __tsan_release(addr);
#endif
}
void tsan_acquire([[maybe_unused]] void* addr) {
#if SHIM_TSAN
  __tsan_acquire(addr);
#endif
}

[[noreturn]] void fiber_main();

// Scheduler -> fiber f.
void switch_to_fiber(Fiber& f) {
  g->current = &f;
#if SHIM_TSAN
  // The first switch into a fresh fiber carries the scheduler's history (the host's writes before the launch,
  // the previous blocks); later switches carry nothing.
  __tsan_switch_to_fiber(f.tsan_fiber, f.started ? __tsan_switch_to_fiber_no_sync : 0);
#endif
#if SHIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  f.started = true;
#if defined(__x86_64__)
  cuda_shim_switch(&g->sched_sp, f.sp);
#else
  swapcontext(&g->sched_uc, &f.uc);
#endif
#if SHIM_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g->current = nullptr;
}

// Fiber -> scheduler; returns when the scheduler switches back. `dying`: the fiber will never resume.
void switch_to_scheduler(bool dying) {
  Fiber& f = *g->current;
  // Everything this thread did happens before the host's next look at the launch (the end of the block);
  // other threads of the block only synchronise with it through barriers.
  tsan_release(&g->to_host);
#if SHIM_TSAN
  __tsan_switch_to_fiber(g->sched_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if SHIM_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.asan_fake, g->sched_stack_bottom, g->sched_stack_size);
#else
  (void)dying;
#endif
#if defined(__x86_64__)
  cuda_shim_switch(&f.sp, g->sched_sp);
#else
  swapcontext(&f.uc, &g->sched_uc);
#endif
#if SHIM_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake, &g->sched_stack_bottom, &g->sched_stack_size);
#endif
}

// ---- diagnostics ----------------------------------------------------------------------------------------
const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash != nullptr ? slash + 1 : path;
}

std::string vformat(const char* fmt, va_list ap) {
  char buf[2048];
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  return buf;
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

std::string where(const Loc& loc) { return format("%s:%u", base_name(loc.file_name()), loc.line()); }

std::string who(const Fiber& f) {
  return format("thread (%u,%u,%u) [warp %d lane %d]", f.tid.x, f.tid.y, f.tid.z, f.warp, f.lane);
}

std::string context_prefix() {
  std::string s = format("%s block (%u,%u,%u)", g->kernel, g->bidx.x, g->bidx.y, g->bidx.z);
  if (g->current != nullptr) s += " " + who(*g->current);
  return s;
}

bool same_loc(const Loc& a, const Loc& b) {
  return a.line() == b.line() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

// Records the launch's first error (later ones are consequences).
void record(const std::string& msg) {
  if (!g->failed) {
    g->failed = true;
    g->error = msg;
  }
  tsan_release(&g->to_host);  // the host reads the message after the launch
}

std::string describe_wait(const Fiber& f) {
  switch (f.state) {
    case State::Barrier:
      return "__syncthreads at " + where(f.where);
    case State::Coll:
      return format("%s(mask 0x%08x) at %s", f.name, f.mask, where(f.where).c_str());
    case State::Done:
      return "exited";
    default:
      return "running";
  }
}

// No fiber can run and some have not exited: name where each group of threads waits.
std::string describe_deadlock() {
  std::string detail;
  // First a collective that waits for a lane which is elsewhere: the usual cause (a shuffle in divergent code).
  for (const Fiber& f : g->fibers) {
    if (f.state != State::Coll) continue;
    const Fiber* lanes = &g->fibers[static_cast<size_t>(f.warp) * kWarp];
    for (int l = 0; l < kWarp; ++l) {
      if (!((f.mask >> l) & 1u)) continue;
      const Fiber& o = lanes[l];
      if (o.state != State::Coll || !same_loc(o.where, f.where)) {
        return format(
            "deadlock: collective mask mismatch: %s waits at %s, but lane %d named in its mask is at %s "
            "(a warp collective in divergent code?)",
            who(f).c_str(), describe_wait(f).c_str(), l, describe_wait(o).c_str());
      }
    }
  }
  // Otherwise list the distinct wait points.
  std::vector<std::pair<std::string, int>> groups;
  for (const Fiber& f : g->fibers) {
    if (f.state == State::Done) continue;
    const std::string w = describe_wait(f);
    bool found = false;
    for (auto& [k, n] : groups) {
      if (k == w) {
        ++n;
        found = true;
      }
    }
    if (!found) groups.emplace_back(w, 1);
  }
  for (const auto& [k, n] : groups) detail += format("%s%d threads at %s", detail.empty() ? "" : "; ", n, k.c_str());
  return "deadlock: no thread can proceed: " + detail;
}

// ---- fibers ---------------------------------------------------------------------------------------------
void thread_exit(Fiber& f) {
  f.state = State::Done;
  ++g->done;
  tsan_release(&g->to_host);
  if (g->arrived > 0) {
    for (const Fiber& o : g->fibers) {
      if (o.state == State::Barrier) {
        record(format("%s: divergent __syncthreads: this thread exited while %d threads of the block wait at "
                      "__syncthreads at %s",
                      context_prefix().c_str(), g->arrived, where(o.where).c_str()));
        return;
      }
    }
  }
  const Fiber* lanes = &g->fibers[static_cast<size_t>(f.warp) * kWarp];
  const int warp_lanes = std::min(kWarp, g->nthreads - f.warp * kWarp);
  for (int l = 0; l < warp_lanes; ++l) {
    const Fiber& o = lanes[l];
    if (o.state == State::Coll && ((o.mask >> f.lane) & 1u)) {
      record(format("%s: collective mask mismatch: this lane exited while lane %d waits at %s, whose mask names it "
                    "(a warp collective in divergent code?)",
                    context_prefix().c_str(), o.lane, describe_wait(o).c_str()));
      return;
    }
  }
}

[[noreturn]] void fiber_main() {
  Fiber& f = *g->current;
#if SHIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g->sched_stack_bottom, &g->sched_stack_size);
#endif
  tsan_acquire(&g->to_threads);
  g->body.call(g->body.state);
  thread_exit(f);
  switch_to_scheduler(/*dying=*/true);
  std::abort();  // never resumed
}

__attribute__((no_sanitize("address", "thread"))) void prepare_fiber(Fiber& f, char* slot) {
  f.stack = slot + static_cast<size_t>(sysconf(_SC_PAGESIZE));  // guard page below
#if SHIM_ASAN
  __asan_unpoison_memory_region(f.stack, kStackBytes);  // the previous block's frames left redzones here
#endif
  f.state = State::Runnable;
  f.started = false;
  f.asan_fake = nullptr;
  f.async_queue.clear();  // copies a thread never waited for die with its block
  f.open_group = 0;
#if defined(__x86_64__)
  // Initial frame for cuda_shim_switch: control words, six callee-saved registers, return address fiber_main,
  // and a zero fake return address so fiber_main starts with the ABI's stack alignment.
  auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(&fiber_main);
  for (int i = 3; i <= 8; ++i) top[-i] = 0;
  uint32_t ctl[2] = {0x1F80u, 0x037Fu};  // default MXCSR, x87 control word
  std::memcpy(&top[-9], ctl, sizeof(ctl));
  f.sp = &top[-9];
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
#if SHIM_TSAN
  f.tsan_fiber = __tsan_create_fiber(0);
#endif
}

void release_fibers() {
#if SHIM_TSAN
  for (Fiber& f : g->fibers) {
    if (f.tsan_fiber != nullptr) __tsan_destroy_fiber(f.tsan_fiber);
    f.tsan_fiber = nullptr;
  }
#endif
}

// Shared memory. Every __shared__ variable is a function-local static (cuda_shim.h), so it has a local
// symbol "_ZZ<function>E<name>" in .bss; GCC ignores section attributes on the statics of template functions, so
// the runtime finds them in the library's own symbol table (.symtab, read once from the file) instead. Only
// kernel sources define function-local statics in .bss in this library (the runtime's own are thread_local or
// read-only), so that list is exactly shared memory.
struct Region {
  char* p;
  size_t n;
};

std::vector<Region> find_shared_memory() {
  std::vector<Region> out;
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&find_shared_memory), &info) == 0 || info.dli_fname == nullptr) return out;
  const int fd = open(info.dli_fname, O_RDONLY);
  if (fd < 0) return out;
  struct stat st{};
  fstat(fd, &st);
  void* map = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return out;
  const auto* base = static_cast<const char*>(map);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
  const char* shstr = base + sh[eh->e_shstrndx].sh_offset;
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const auto* syms = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
    const char* names = base + sh[sh[i].sh_link].sh_offset;
    const size_t count = sh[i].sh_size / sizeof(Elf64_Sym);
    for (size_t k = 0; k < count; ++k) {
      const Elf64_Sym& s = syms[k];
      if (ELF64_ST_TYPE(s.st_info) != STT_OBJECT || s.st_size == 0 || s.st_shndx == SHN_UNDEF ||
          s.st_shndx >= eh->e_shnum) {
        continue;
      }
      const char* name = names + s.st_name;
      const char* section = shstr + sh[s.st_shndx].sh_name;
      // _ZZ: a function-local static; not the runtime's own (cuda_shim::) nor the standard library's (std::).
      const bool local_static = std::strncmp(name, "_ZZ", 3) == 0 && std::strncmp(name, "_ZZN9cuda_shim", 14) != 0 &&
                                std::strncmp(name, "_ZZNSt", 6) != 0 && std::strncmp(name, "_ZZSt", 5) != 0;
      if (local_static && std::strncmp(section, ".bss", 4) == 0) {
        out.push_back({static_cast<char*>(info.dli_fbase) + s.st_value, s.st_size});
      }
    }
  }
  munmap(map, static_cast<size_t>(st.st_size));
  return out;
}

// 0xff bytes (NaN as fp32 and fp16, -1 as an integer) in all shared memory before each block; word stores
// through a volatile pointer (no intercepted memset, no sanitizer checks).
std::vector<Region> g_shared;  // found on the first launch
bool g_shared_found = false;

__attribute__((no_sanitize("address", "thread"))) void poison_shared() {
  if (!g_shared_found) {
    g_shared = find_shared_memory();
    g_shared_found = true;
  }
  for (const Region& r : g_shared) {
    volatile char* p = r.p;
    size_t i = 0;
    for (; i < r.n && (reinterpret_cast<uintptr_t>(p + i) & 7) != 0; ++i) p[i] = static_cast<char>(0xff);
    for (; i + 8 <= r.n; i += 8) *reinterpret_cast<volatile uint64_t*>(p + i) = ~uint64_t{0};
    for (; i < r.n; ++i) p[i] = static_cast<char>(0xff);
  }
}

// ---- SIGSEGV / SIGBUS during a launch: the faulting thread's identity and the address, then the launch fails.
void on_fault(int sig, siginfo_t* info, void*) {
  if (g == nullptr || g->current == nullptr) {  // not ours
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  std::string what;
  const Fiber& f = *g->current;
  const auto stack_lo = reinterpret_cast<uintptr_t>(f.stack);
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  if (addr + page >= stack_lo && addr < stack_lo) {
    what = "stack overflow of the thread's fiber";
  } else if (g_describe != nullptr) {
    what = g_describe(info->si_addr);
  }
  if (what.empty()) what = "not inside any buffer of the launch";
  record(format("%s: invalid memory access (%s) at address %p: %s", context_prefix().c_str(),
                sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", info->si_addr, what.c_str()));
  // The thread never resumes: back to the scheduler from the handler (SA_NODEFER keeps SIGSEGV unblocked), which
  // ends the launch. The handler's frame is left on the abandoned fiber's stack.
  switch_to_scheduler(/*dying=*/true);
}

struct FaultHandlers {
  struct sigaction old_segv{}, old_bus{};
  stack_t old_alt{};
  std::vector<char> alt;
  FaultHandlers() : alt(256 * 1024) {
    stack_t ss{};
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    sigaltstack(&ss, &old_alt);
    struct sigaction sa{};
    sa.sa_sigaction = &on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
  }
  ~FaultHandlers() {
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaltstack(&old_alt, nullptr);
  }
};

std::vector<int> visit_order(int n, std::mt19937_64& rng) {
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = g_config.order == Order::Reverse ? n - 1 - i : i;
  if (g_config.order == Order::Random) std::shuffle(order.begin(), order.end(), rng);
  return order;
}

// Runs one block to completion or failure.
void run_block(std::mt19937_64& rng) {
  poison_shared();
  g->done = 0;
  g->arrived = 0;
  delete[] g->barrier_sync;
  g->barrier_sync = new char[8];
  for (int i = 0; i < g->nthreads; ++i) prepare_fiber(g->fibers[i], g->stacks + static_cast<size_t>(i) * g->slot_bytes);
  std::vector<int> order = visit_order(g->nthreads, rng);
  while (!g->failed && g->done < g->nthreads) {
    if (g_config.order == Order::Random) std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (int i : order) {
      Fiber& f = g->fibers[i];
      if (f.state != State::Runnable) continue;
      ran = true;
      switch_to_fiber(f);
      if (g->failed) break;
    }
    if (!ran && !g->failed) record(format("%s: %s", context_prefix().c_str(), describe_deadlock().c_str()));
  }
  tsan_acquire(&g->to_host);  // block b happens before block b + 1 (they share the shared memory)
  tsan_release(&g->to_threads);
  release_fibers();
}

// Every block of the grid in order, until one fails.
void run_all_blocks() {
  std::mt19937_64 rng(g_config.seed);
  const dim3 grid = g->grid;
  const long long nblocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  for (long long k = 0; k < nblocks && !g->failed; ++k) {
    const long long b = g_config.order == Order::Reverse ? nblocks - 1 - k : k;
    g->bidx = make_uint3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                         static_cast<unsigned>(b / (static_cast<long long>(grid.x) * grid.y)));
    run_block(rng);
  }
}

}  // namespace

// ---- prelude entry points -------------------------------------------------------------------------------
const uint3& thread_idx() { return g->current->tid; }
const uint3& block_idx() { return g->bidx; }
const dim3& block_dim() { return g->block; }
const dim3& grid_dim() { return g->grid; }

void fail(const Loc& loc, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  const std::string msg = vformat(fmt, ap);
  va_end(ap);
  record(format("%s: %s at %s", context_prefix().c_str(), msg.c_str(), where(loc).c_str()));
  switch_to_scheduler(/*dying=*/true);
  std::abort();  // never resumed
}

void check_aligned(const void* p, size_t align, const char* what, const Loc& loc) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    fail(loc, "misaligned vector load: %s of a %zu-byte type at address %p (not a multiple of %zu)", what, align, p,
         align);
  }
}

void barrier(const Loc& loc) {
  Fiber& f = *g->current;
  if (g->done > 0) {
    const Fiber* gone = nullptr;
    for (const Fiber& o : g->fibers) {
      if (o.state == State::Done) {
        gone = &o;
        break;
      }
    }
    fail(loc, "divergent __syncthreads: reached after %d threads of the block exited (first: %s)", g->done,
         who(*gone).c_str());
  }
  f.state = State::Barrier;
  f.where = loc;
  tsan_release(g->barrier_sync);
  if (++g->arrived == g->nthreads) {
    for (Fiber& o : g->fibers) {
      if (!same_loc(o.where, loc)) {
        fail(loc, "divergent __syncthreads: %s waits at a different __syncthreads (%s); this one", who(o).c_str(),
             where(o.where).c_str());
      }
    }
    for (Fiber& o : g->fibers) o.state = State::Runnable;
    g->arrived = 0;
  } else {
    switch_to_scheduler(false);
  }
  tsan_acquire(g->barrier_sync);
}

namespace {

// half (IEEE binary16 bits) -> float, exactly.
float half_to_float(uint32_t h) {
  const uint32_t exp = (h >> 10) & 31u, man = h & 1023u;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man != 0 ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(man | 1024u), static_cast<int>(exp) - 25);
  }
  return (h & 0x8000u) != 0 ? -v : v;
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 for a whole warp, from the PTX ISA fragment layout (lane L,
// g = L >> 2, t = L & 3; "Matrix Fragments for mma.m16n8k16 with floating point type"):
//   A (16x16, f16x2 registers a0..a3): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
//     a3 = A[g+8][2t+8, 2t+9] (the lower column in the lower 16 bits);
//   B (16x8, b0, b1): b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g];
//   C, D (16x8 f32, c0..c3): C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
// Each D element is C + the 16 products, summed in double (the products of two halves are exact) and rounded
// to float once; the hardware accumulates in fp32 in an order the ISA does not specify.
void warp_mma(Fiber* lanes) {
  float a[16][16], b[16][8], c[16][8];
  for (int l = 0; l < kWarp; ++l) {
    const uint32_t* v = lanes[l].value.w;
    const int g = l >> 2, t = l & 3;
    for (int k = 0; k < 4; ++k) {
      const int row = g + 8 * (k & 1), col = 2 * t + 8 * (k >> 1);
      a[row][col] = half_to_float(v[k] & 0xffffu);
      a[row][col + 1] = half_to_float(v[k] >> 16);
    }
    for (int k = 0; k < 2; ++k) {
      b[2 * t + 8 * k][g] = half_to_float(v[4 + k] & 0xffffu);
      b[2 * t + 8 * k + 1][g] = half_to_float(v[4 + k] >> 16);
    }
    for (int k = 0; k < 4; ++k) std::memcpy(&c[g + 8 * (k >> 1)][2 * t + (k & 1)], &v[6 + k], 4);
  }
  for (int l = 0; l < kWarp; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int k = 0; k < 4; ++k) {
      const int row = g + 8 * (k >> 1), col = 2 * t + (k & 1);
      double sum = c[row][col];
      for (int i = 0; i < 16; ++i) sum += static_cast<double>(a[row][i]) * b[i][col];
      const float d = static_cast<float>(sum);
      std::memcpy(&lanes[l].result.w[k], &d, 4);
    }
  }
}

}  // namespace

uint64_t collective(Coll kind, unsigned mask, uint64_t value, int arg, int width, const char* name,
                    const Loc& loc) {
  Wide v{};
  v.w[0] = static_cast<uint32_t>(value);
  v.w[1] = static_cast<uint32_t>(value >> 32);
  const Wide r = collective_wide(kind, mask, v, arg, width, name, loc);
  return r.w[0] | static_cast<uint64_t>(r.w[1]) << 32;
}

Wide collective_wide(Coll kind, unsigned mask, const Wide& value, int arg, int width, const char* name,
                     const Loc& loc) {
  Fiber& f = *g->current;
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0) {
    fail(loc, "%s: width %d is not a power of 2 in 1..32", name, width);
  }
  if (!((mask >> f.lane) & 1u)) fail(loc, "%s: mask 0x%08x does not include the calling lane %d", name, mask, f.lane);
  if ((kind == Coll::Mma || kind == Coll::Gather) && mask != 0xffffffffu) {
    fail(loc, "%s: mask 0x%08x: a .sync.aligned warp instruction needs all 32 lanes", name, mask);
  }
  Fiber* lanes = &g->fibers[static_cast<size_t>(f.warp) * kWarp];
  const int warp_lanes = std::min(kWarp, g->nthreads - f.warp * kWarp);
  f.state = State::Coll;
  f.where = loc;
  f.kind = kind;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.name = name;
  f.value = value;
  bool complete = true;
  for (int l = 0; l < kWarp; ++l) {
    if (!((mask >> l) & 1u)) continue;
    if (l >= warp_lanes) fail(loc, "%s: mask 0x%08x names lane %d, which does not exist", name, mask, l);
    const Fiber& o = lanes[l];
    if (o.state == State::Done) {
      fail(loc, "collective mask mismatch: %s(mask 0x%08x) names lane %d, which already exited (a warp collective "
           "in divergent code?)", name, mask, l);
    }
    if (o.state != State::Coll) {
      complete = false;
      continue;
    }
    if (o.mask != mask || o.kind != kind || !same_loc(o.where, loc)) {
      fail(loc, "collective mask mismatch: %s(mask 0x%08x) while lane %d waits at %s", name, mask, l,
           describe_wait(o).c_str());
    }
  }
  if (kind == Coll::SyncWarp) tsan_release(&g->warp_sync[f.warp]);
  if (complete && kind == Coll::Mma) {
    warp_mma(lanes);
    for (int l = 0; l < kWarp; ++l) lanes[l].state = State::Runnable;
  } else if (complete) {
    uint64_t votes = 0;
    for (int l = 0; l < kWarp; ++l) {
      if ((mask >> l) & 1u) votes |= static_cast<uint64_t>((lanes[l].value.w[0] | lanes[l].value.w[1]) != 0) << l;
    }
    for (int l = 0; l < kWarp; ++l) {
      if (!((mask >> l) & 1u)) continue;
      Fiber& d = lanes[l];
      // each lane's own source lane, delta or lane mask (they may differ between lanes)
      const int w = d.width, a = d.arg;
      const int seg = l & ~(w - 1);
      int src = l;
      switch (kind) {
        case Coll::Shfl:
          src = seg + (a & (w - 1));
          break;
        case Coll::ShflUp:
          src = (l - seg) >= a ? l - a : l;
          break;
        case Coll::ShflDown:
          src = (l - seg) + a < w ? l + a : l;
          break;
        case Coll::ShflXor:
          src = l ^ a;
          if (src < seg || src >= seg + w) src = l;
          break;
        default:
          break;
      }
      if (src != l && !((mask >> src) & 1u)) {
        fail(loc, "%s(mask 0x%08x): lane %d reads lane %d, which is not in the mask", name, mask, l, src);
      }
      d.result = Wide{};
      switch (kind) {
        case Coll::Ballot:
          d.result.w[0] = static_cast<uint32_t>(votes);
          break;
        case Coll::Any:
          d.result.w[0] = votes != 0;
          break;
        case Coll::All:
          d.result.w[0] = votes == mask;
          break;
        case Coll::SyncWarp:
          break;
        case Coll::Gather:
          for (int k = 0; k < 8; ++k) {
            const uint32_t s = d.value.w[2 + k];
            if (s == 0xffffffffu) continue;
            if (s >= static_cast<uint32_t>(kWarp)) fail(loc, "%s: lane %d names source lane %u", name, l, s);
            d.result.w[2 * k] = lanes[s].value.w[0];
            d.result.w[2 * k + 1] = lanes[s].value.w[1];
          }
          break;
        default:
          d.result.w[0] = lanes[src].value.w[0];
          d.result.w[1] = lanes[src].value.w[1];
      }
      d.state = State::Runnable;
    }
  } else {
    switch_to_scheduler(false);
  }
  if (kind == Coll::SyncWarp) tsan_acquire(&g->warp_sync[f.warp]);
  return f.result;
}

bool is_shared(const void* p, size_t bytes) {
  if (!g_shared_found) {
    g_shared = find_shared_memory();
    g_shared_found = true;
  }
  const auto* c = static_cast<const char*>(p);
  for (const Region& r : g_shared) {
    if (c >= r.p && c + bytes <= r.p + r.n) return true;
  }
  return false;
}

void async_copy(void* dst, const void* src, size_t bytes) {
  Fiber& f = *g->current;
  f.async_queue.emplace_back(f.open_group, AsyncCopy{dst, src, bytes});
}

void async_commit() { ++g->current->open_group; }

bool async_next(int pending, AsyncCopy* copy) {
  Fiber& f = *g->current;
  // committed groups are 0 .. open_group - 1; the `pending` most recent may stay in flight
  const long done_below = f.open_group - std::max(pending, 0);
  if (f.async_queue.empty() || f.async_queue.front().first >= done_below) return false;
  *copy = f.async_queue.front().second;
  f.async_queue.pop_front();
  return true;
}

void run_grid(dim3 grid, dim3 block, size_t dynamic_smem, Body body, const char* kernel, const Loc& loc) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > 1024 || block.z > 64 || grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 ||
      grid.z > 65535 || dynamic_smem != 0) {
    g_last_code = cudaErrorInvalidConfiguration;
    g_last_error = format("%s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u) dynamic smem %zu at %s",
                          kernel, grid.x, grid.y, grid.z, block.x, block.y, block.z, dynamic_smem,
                          where(loc).c_str());
    return;
  }
  Grid state;
  g = &state;
  state.grid = grid;
  state.block = block;
  state.body = body;
  state.kernel = kernel;
  state.launch_loc = loc;
  state.nthreads = static_cast<int>(nthreads);
  state.fibers.resize(state.nthreads);
  for (int i = 0; i < state.nthreads; ++i) {
    Fiber& f = state.fibers[i];
    f.linear = i;
    f.tid = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.lane = i % kWarp;
    f.warp = i / kWarp;
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  state.slot_bytes = page + kStackBytes;
  state.stacks_bytes = state.slot_bytes * state.nthreads;
  void* mem = mmap(nullptr, state.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  if (mem == MAP_FAILED) {
    g_last_code = cudaErrorMemoryAllocation;
    g_last_error = "cuda_shim: cannot map fiber stacks";
    g = nullptr;
    return;
  }
  state.stacks = static_cast<char*>(mem);
  for (int i = 0; i < state.nthreads; ++i) mprotect(state.stacks + i * state.slot_bytes, page, PROT_NONE);
#if SHIM_TSAN
  state.sched_tsan = __tsan_get_current_fiber();
#endif
  tsan_release(&state.to_threads);  // the host's writes before the launch happen before every thread

  {
    FaultHandlers handlers;
    run_all_blocks();
  }
  tsan_acquire(&state.to_host);  // every thread's writes happen before the host reads the results
  delete[] state.barrier_sync;
#if SHIM_ASAN
  // The fibers' frames left redzones in the shadow memory; memory mapped here later must not inherit them.
  __asan_unpoison_memory_region(state.stacks, state.stacks_bytes);
#endif
  munmap(state.stacks, state.stacks_bytes);
  g_last_code = state.failed ? cudaErrorLaunchFailure : cudaSuccess;
  g_last_error = state.failed ? "cuda_shim: " + state.error : "";
  g = nullptr;
}

const char* kernel_name(const char* written, const char* launcher) {
  static thread_local std::string name;
  name = written;
  const char* with = std::strstr(launcher, "[with ");
  if (with != nullptr) {
    const char* end = std::strchr(with, ']');
    name += " " + std::string(with, end != nullptr ? end + 1 : with + std::strlen(with));
  }
  return name.c_str();
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last_code;
  g_last_code = cudaSuccess;
  return e;
}

void configure(const Config& config) { g_config = config; }
size_t shared_memory_bytes() {
  size_t n = 0;
  for (const Region& r : find_shared_memory()) n += r.n;
  return n;
}
const std::string& last_error_text() { return g_last_error; }
void clear_last_error() {
  g_last_code = cudaSuccess;
  g_last_error.clear();
}
void set_address_describer(AddressDescriber d) { g_describe = d; }

}  // namespace cuda_shim
