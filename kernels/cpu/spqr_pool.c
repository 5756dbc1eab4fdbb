/* spqr_pool.c: the one thread pool of the CPU kernels.
 *
 * The calling thread and (threads - 1) workers split a loop into chunks that each thread claims with one
 * compare-and-swap, so a thread the OS deschedules (a busy machine) delays at most the one chunk it holds
 * while the others take the rest. Idle workers spin for `spin_us` (a decode step runs a few hundred short
 * loops back to back), then sleep on a futex, so a pool never burns a core between requests.
 *
 * Claim word: generation (24 bits) | chunk count (20 bits) | next chunk (20 bits). A worker decides whether
 * a chunk is left from the claim word alone, and reads the job descriptor only after its compare-and-swap
 * succeeded: a claim of generation g proves job g is unfinished, so the caller is not rewriting the
 * descriptor for the next job, and the acquire pairs with the release that published it. A worker that wakes
 * late for an old generation fails its compare-and-swap and runs nothing.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SPQR_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define SPQR_PAUSE() __asm__ __volatile__("yield")
#else
#define SPQR_PAUSE() ((void)0)
#endif

#include "spqr_internal.h"

#define MAX_THREADS 256

typedef struct {
  spqr_task_fn fn;
  void *ctx;
  int64_t n, grain;
} job_desc;

#define GEN_MASK 0xFFFFFFu
#define CHUNK_BITS 20
#define MAX_CHUNKS ((1u << CHUNK_BITS) - 1)

static struct {
  pthread_mutex_t resize_lock;
  int threads;           /* including the caller */
  _Atomic int spin_us;     /* read by spinning workers while the caller may change it */
  pthread_t tid[MAX_THREADS];
  _Atomic uint64_t claim;    /* generation << 40 | chunks << 20 | next chunk */
  _Atomic uint32_t wake;     /* the generation, as a futex word */
  _Atomic uint32_t done;     /* chunks finished in the current generation */
  _Atomic int sleepers;
  _Atomic int quit;
  _Atomic int serial;        /* 1: every loop runs on the caller alone (spqr_cpu_set_serial) */
  job_desc desc;
} pool = {.resize_lock = PTHREAD_MUTEX_INITIALIZER, .threads = 1, .spin_us = 200};

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static void futex_wait(_Atomic uint32_t *addr, uint32_t expected) {
#ifdef __linux__
  syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
#else
  (void)addr;
  (void)expected;
  usleep(50);
#endif
}

static void futex_wake_all(_Atomic uint32_t *addr) {
#ifdef __linux__
  syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
#else
  (void)addr;
#endif
}

/* Claim and run chunks of generation `gen` (24 bits) until none is left. */
static void run_chunks(uint32_t gen) {
  uint64_t cur = atomic_load_explicit(&pool.claim, memory_order_acquire);
  for (;;) {
    if ((uint32_t)(cur >> 40) != gen) return;
    const uint32_t chunks = (uint32_t)(cur >> CHUNK_BITS) & MAX_CHUNKS, idx = (uint32_t)cur & MAX_CHUNKS;
    if (idx >= chunks) return;
    if (!atomic_compare_exchange_weak_explicit(&pool.claim, &cur, cur + 1, memory_order_acq_rel,
                                               memory_order_acquire))
      continue;
    const job_desc *d = &pool.desc; /* published before the claim word: safe to read once claimed */
    int64_t b = (int64_t)idx * d->grain, e = b + d->grain;
    d->fn(d->ctx, b, e < d->n ? e : d->n);
    atomic_fetch_add_explicit(&pool.done, 1, memory_order_acq_rel);
    cur = atomic_load_explicit(&pool.claim, memory_order_acquire);
  }
}

static void *worker(void *arg) {
  (void)arg;
  uint32_t seen = atomic_load_explicit(&pool.wake, memory_order_acquire);
  for (;;) {
    uint32_t gen;
    double t0 = now_us();
    int spins = 0;
    while ((gen = atomic_load_explicit(&pool.wake, memory_order_acquire)) == seen) {
      if (atomic_load_explicit(&pool.quit, memory_order_relaxed)) return NULL;
      SPQR_PAUSE();
      if (++spins % 256 == 0 && now_us() - t0 > atomic_load_explicit(&pool.spin_us, memory_order_relaxed)) {
        atomic_fetch_add(&pool.sleepers, 1);
        if (atomic_load(&pool.wake) == seen && !atomic_load(&pool.quit)) futex_wait(&pool.wake, seen);
        atomic_fetch_sub(&pool.sleepers, 1);
        t0 = now_us();
      }
    }
    seen = gen;
    run_chunks(gen & GEN_MASK);
  }
}

int64_t spqr_grain(int64_t n, int64_t per_thread) {
  int64_t parts = (int64_t)pool.threads * per_thread;
  int64_t g = (n + parts - 1) / parts;
  return g < 1 ? 1 : g;
}

void spqr_parallel_for(int64_t n, int64_t grain, spqr_task_fn fn, void *ctx) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if ((n + grain - 1) / grain > MAX_CHUNKS) grain = (n + MAX_CHUNKS - 1) / MAX_CHUNKS;
  int64_t chunks = (n + grain - 1) / grain;
  if (pool.threads == 1 || chunks == 1 || atomic_load_explicit(&pool.serial, memory_order_relaxed)) {
    fn(ctx, 0, n);
    return;
  }
  uint32_t gen = atomic_load_explicit(&pool.wake, memory_order_relaxed) + 1;
  pool.desc = (job_desc){fn, ctx, n, grain};
  atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
  atomic_store_explicit(&pool.claim, (uint64_t)(gen & GEN_MASK) << 40 | (uint64_t)chunks << CHUNK_BITS,
                        memory_order_release);
  atomic_store_explicit(&pool.wake, gen, memory_order_release);
  if (atomic_load(&pool.sleepers) > 0) futex_wake_all(&pool.wake);
  run_chunks(gen & GEN_MASK);
  /* wait for chunks other threads hold; yield now and then so a descheduled holder on this core runs */
  int spins = 0;
  while (atomic_load_explicit(&pool.done, memory_order_acquire) < (uint32_t)chunks) {
    SPQR_PAUSE();
    if (++spins % 1024 == 0) sched_yield();
  }
}

static void stop_workers(void) {
  atomic_store(&pool.quit, 1);
  atomic_fetch_add(&pool.wake, 0); /* workers test `quit` while spinning; sleepers need a wake-up */
  futex_wake_all(&pool.wake);
  for (int i = 1; i < pool.threads; i++) pthread_join(pool.tid[i], NULL);
  atomic_store(&pool.quit, 0);
  pool.threads = 1;
}

int spqr_cpu_set_threads(int threads, int spin_us) {
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  pthread_mutex_lock(&pool.resize_lock);
  if (spin_us >= 0) atomic_store_explicit(&pool.spin_us, spin_us, memory_order_relaxed);
  if (threads != pool.threads) {
    stop_workers();
    int started = 1;
    for (int i = 1; i < threads; i++) {
      if (pthread_create(&pool.tid[i], NULL, worker, NULL) != 0) break;
      started++;
    }
    pool.threads = started;
  }
  int n = pool.threads;
  pthread_mutex_unlock(&pool.resize_lock);
  return n;
}

int spqr_cpu_threads(void) { return pool.threads; }

void spqr_cpu_set_serial(int serial) { atomic_store_explicit(&pool.serial, serial != 0, memory_order_relaxed); }

/* ---- scratch arenas ------------------------------------------------------------------------------- */
static struct {
  void *ptr;
  size_t size;
} scratch[SPQR_SCRATCH_SLOTS];

void *spqr_scratch(int slot, size_t bytes) {
  if (bytes > scratch[slot].size) {
    free(scratch[slot].ptr);
    size_t size = bytes + bytes / 4 + 4096;
    scratch[slot].ptr = aligned_alloc(64, (size + 63) & ~(size_t)63);
    scratch[slot].size = scratch[slot].ptr ? size : 0;
  }
  return scratch[slot].ptr;
}
