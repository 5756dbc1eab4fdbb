/* spqr_internal.h: what the CPU kernel files share (not part of the ABI).
 *
 * CPU layout of one k-block (64 stored columns) of one row tile (16 rows), codes section, b = wbits:
 *   a "quad" q (q = 0..15) is the 16 x 4 block of codes of columns 4q .. 4q+3: byte 4*r + c = row r, col 4q+c.
 *   b = 4: 8 chunks of 64 bytes; chunk k = quad 2k in the low nibbles, quad 2k+1 in the high nibbles.
 *   b = 2: 4 chunks; chunk k = quads 4k+i at bits 2i .. 2i+1 (i = 0..3): one chunk per group of 16 columns.
 *   b = 3: 6 chunks, three per pair of groups P (quads 8P + i, i = 0..7):
 *          A = 3P:   q0 bits 0-2, q1 bits 3-5, bits 0-1 of q2 at bits 6-7
 *          B = 3P+1: q3 bits 0-2, q4 bits 3-5, bits 0-1 of q5 at bits 6-7
 *          C = 3P+2: q6 bits 0-2, q7 bits 3-5, bit 2 of q2 at bit 6, bit 2 of q5 at bit 7
 *        so q2 = ((A >> 6) & 3) | ((C >> 4) & 4) and q5 = ((B >> 6) & 3) | ((C >> 5) & 4).
 *   Every b: 128*b bytes a k-block, exactly the bits of the file's codes.
 * Stats section of a k-block: for each group j = 0..3 the 16 rows' scale and zero codes: stat_bits <= 4:
 * 16 bytes, byte r = scale code | zero code << 4 of row r (one widening load then an and and a shift give
 * both); stat_bits > 4: 32 bytes, the 16 scale codes then the 16 zero codes. Then the 16 fp16 second-order
 * numbers [s_scale, z_scale, s_zero, z_zero] of groups 0..3 (32 bytes).
 */
#ifndef SPQR_INTERNAL_H
#define SPQR_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "spqr_cpu.h"

#define SPQR_ROWS 16      /* rows of a row tile (beta2) */
#define SPQR_GROUP 16     /* stored columns of a group (beta1) */
#define SPQR_KCOLS 64     /* stored columns of a k-block */
#define SPQR_QUAD_BYTES 64
#define SPQR_MAX_NT 8     /* activation rows one pass over a row tile's codes serves */

static inline int32_t spqr_stat_group_bytes(int32_t stat_bits) { return stat_bits <= 4 ? 16 : 32; }

/* fp16 bits -> fp32, exact for every fp16 value, branch-free (so that loops over it vectorize): the 15
 * magnitude bits moved to fp32's exponent/mantissa position are the value times 2^-112 (normal and
 * subnormal alike), then scaled back; infinities and NaNs keep an all-ones exponent. */
static inline float spqr_half_to_float(uint16_t h) {
  uint32_t mag = (uint32_t)(h & 0x7FFF) << 13, sign = (uint32_t)(h & 0x8000) << 16;
  float f;
  memcpy(&f, &mag, 4);
  f *= 0x1p112f;
  uint32_t bits;
  memcpy(&bits, &f, 4);
  bits |= sign | ((h & 0x7C00) == 0x7C00 ? 0x7F800000u : 0u);
  memcpy(&f, &bits, 4);
  return f;
}

/* fp32 -> fp16 bits, rounded to nearest even (as torch's .half()): overflow to infinity, NaN kept quiet. */
static inline uint16_t spqr_float_to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
  const uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return sign | (a > 0x7F800000u ? 0x7E00 : 0x7C00);
  if (a < 0x38800000u) { /* below 2^-14: a multiple of 2^-24 in fp16, the rounding is nearbyintf's */
    float m;
    memcpy(&m, &a, 4);
    return sign | (uint16_t)nearbyintf(m * 0x1p24f);
  }
  uint32_t r = a + 0x0FFFu + ((a >> 13) & 1u); /* round at bit 13, ties to even */
  r = (r >> 13) - (112u << 10);                /* exponent bias 127 -> 15 */
  return sign | (uint16_t)(r > 0x7C00u ? 0x7C00u : r);
}

/* Vector loops: one source compiled for x86-64-v4 (AVX-512), v3 (AVX2) and the baseline, picked when the
 * library loads (GCC function multiversioning); results are the same in every clone (explicit fmaf,
 * -ffp-contract=off, fixed summation order). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__) && \
    !defined(__SANITIZE_ADDRESS__)
#define SPQR_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPQR_VEC_CLONES
#endif

/* ---- thread pool (spqr_pool.c) ---------------------------------------------------------------------- */
typedef void (*spqr_task_fn)(void *ctx, int64_t begin, int64_t end);
/* Run fn(ctx, b, e) over [0, n) in chunks of `grain`, claimed dynamically by the pool's threads (a thread
 * that is descheduled holds up at most one chunk). Returns when all are done. Not reentrant. */
void spqr_parallel_for(int64_t n, int64_t grain, spqr_task_fn fn, void *ctx);
/* A grain giving each thread about `per_thread` chunks of [0, n). */
int64_t spqr_grain(int64_t n, int64_t per_thread);

/* ---- matmul internals ------------------------------------------------------------------------------- */
/* One matmul's prepared activations: `rows` rows, in stored column order. */
typedef struct spqr_mm_args {
  const spqr_weight *w;
  int32_t rows;
  const int8_t *xq;   /* (rows, xq_stride) int8, zero-padded to whole k-blocks / groups */
  int64_t xq_stride;
  const float *dx;    /* (rows, g_stride): the dequantization step of each group (absmax / 127) */
  const float *xsum;  /* (rows, g_stride): dx * sum of the group's xq = the sum of the dequantized x */
  const int32_t *xqs; /* (rows, g_stride): the sum of the group's xq */
  /* with act_residual (and Q8): the residual x - dx * xq, quantized again with step dx2 = dx / 254 (its
   * range is +-dx/2), so the weight sees activations to about 2^-15 of their group maximum; NULL otherwise.
   * xsum then sums both parts. */
  const int8_t *xq2;
  const float *dx2;
  const int32_t *xqs2;
  int64_t g_stride;
  const float *xst;   /* (rows, xst_stride): exact x in stored order (outliers, dense weights) */
  int64_t xst_stride;
  float *y;
  int64_t y_stride;
} spqr_mm_args;

/* Row tiles [rt0, rt1) of an SPQR weight, every activation row (outliers and bias added). */
typedef void (*spqr_mm_fn)(const spqr_mm_args *a, int64_t rt0, int64_t rt1);

void spqr_mm_spqr_portable(const spqr_mm_args *a, int64_t rt0, int64_t rt1);
void spqr_mm_q8_portable(const spqr_mm_args *a, int64_t rt0, int64_t rt1);
void spqr_mm_dense_portable(const spqr_mm_args *a, int64_t r0, int64_t r1); /* output rows, not tiles */
#if defined(__x86_64__) || defined(_M_X64)
#define SPQR_HAVE_X86 1
void spqr_mm_spqr_avx2(const spqr_mm_args *a, int64_t rt0, int64_t rt1);
void spqr_mm_q8_avx2(const spqr_mm_args *a, int64_t rt0, int64_t rt1);
void spqr_mm_dense_avx2(const spqr_mm_args *a, int64_t r0, int64_t r1);
void spqr_mm_spqr_avx512(const spqr_mm_args *a, int64_t rt0, int64_t rt1);
void spqr_mm_q8_avx512(const spqr_mm_args *a, int64_t rt0, int64_t rt1);
#endif

/* Outliers of rows [r0, r1) and the bias, added to y for every activation row (shared by all ISAs). */
void spqr_mm_epilogue(const spqr_mm_args *a, int64_t r0, int64_t r1);

/* Scratch memory that grows and is kept between calls (one arena per purpose, not thread-safe). */
void *spqr_scratch(int slot, size_t bytes);
enum { SPQR_SCRATCH_MATMUL = 0, SPQR_SCRATCH_DECODER = 1, SPQR_SCRATCH_SLOTS = 2 };

/* Fast elementwise math shared by the decoder (exact libm calls in the portable path). */
void spqr_vec_silu_mul(float *gate, const float *up, int64_t n);  /* gate = silu(gate) * up */
void spqr_vec_exp(float *x, int64_t n);                          /* x = exp(x) */
#endif
