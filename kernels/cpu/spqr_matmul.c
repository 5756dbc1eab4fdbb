/* spqr_matmul.c: y = x W^T on the CPU from the packed weights. Run-time ISA dispatch, the activation
 * quantization every variant shares, the portable kernels, and the outlier/bias epilogue.
 *
 * The arithmetic is the same operation sequence in every variant (an fma where the SIMD code has one), and
 * the integer dot products are exact, so the portable, AVX2 and AVX-512 paths give bit-identical SpQR and
 * Q8 results (tests/test_cpu_kernels.py checks it). Per group g of 16 stored columns, activation row t,
 * weight row r (SpQR, Dettmers et al. 2024, section 3.2: w = s * (q - z), s and z from 3-bit codes with
 * fp16 second-order numbers):
 *   s = sc * ss - ss * zs,  z = zc * sz - sz * zz         (ss * zs and sz * zz are exact in fp32)
 *   acc += s * (d * dx - z * X)                           d = sum_j q_j xq_j, X = dx * sum_j xq_j
 * so y_r = sum_g s * dx * sum_j (q_j - z) xq_j = sum_j w_j xhat_j with xhat = dx * xq.
 */
#include <math.h>
#include <stdlib.h>

#include "spqr_internal.h"

/* ---- ISA selection ---------------------------------------------------------------------------------- */
static int g_isa = -1;

int spqr_cpu_best_isa(void) {
#ifdef SPQR_HAVE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return SPQR_ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SPQR_ISA_AVX2;
#endif
  return SPQR_ISA_PORTABLE;
}

int spqr_cpu_set_isa(int isa) {
  int best = spqr_cpu_best_isa();
  g_isa = isa < SPQR_ISA_PORTABLE ? SPQR_ISA_PORTABLE : isa > best ? best : isa;
  return g_isa;
}

int spqr_cpu_isa(void) {
  if (g_isa < 0) g_isa = spqr_cpu_best_isa();
  return g_isa;
}

int spqr_cpu_abi_version(void) { return SPQR_CPU_ABI_VERSION; }

/* ---- activation quantization ------------------------------------------------------------------------ */
/* One row: xst = x[perm] (stored order, zero beyond `in`), per group of 16: dx = absmax / 127,
 * xq = round(x / dx) (nearest even), X = dx * sum(xq). */
SPQR_VEC_CLONES static void quantize_row(const float *x, int32_t in, const uint16_t *perm, int32_t groups,
                                         float *xst, int8_t *xq, float *dx, float *xsum, int32_t *xqs,
                                         int8_t *xq2, float *dx2, int32_t *xqs2) {
  for (int32_t g = 0; g < groups; g++) {
    float v[16], amax = 0.f;
    for (int k = 0; k < 16; k++) {
      int32_t j = 16 * g + k;
      v[k] = j < in ? x[perm ? perm[j] : j] : 0.f;
    }
    for (int k = 0; k < 16; k++) {
      const float a = fabsf(v[k]);
      amax = a > amax ? a : amax;
    }
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int k = 0; k < 16; k++) {
      float q = nearbyintf(v[k] * inv); /* |v| <= amax, so |q| <= 127 */
      xq[16 * g + k] = (int8_t)q;
      sum += (int32_t)q;
      if (xst) xst[16 * g + k] = v[k];
    }
    dx[g] = amax / 127.f;
    xsum[g] = dx[g] * (float)sum;
    if (xqs) xqs[g] = sum;
    if (xq2) { /* the residual, |x - dx q| <= dx / 2, in steps of dx / 254 */
      const float step = dx[g] / 254.f, inv2 = dx[g] > 0.f ? 254.f / dx[g] : 0.f;
      int32_t sum2 = 0;
      for (int k = 0; k < 16; k++) {
        const float r = v[k] - dx[g] * (float)xq[16 * g + k];
        float q = nearbyintf(r * inv2);
        q = q > 127.f ? 127.f : q < -127.f ? -127.f : q;
        xq2[16 * g + k] = (int8_t)q;
        sum2 += (int32_t)q;
      }
      dx2[g] = step;
      xqs2[g] = sum2;
      xsum[g] = fmaf(step, (float)sum2, xsum[g]);
    }
  }
}

void spqr_cpu_quantize_rows(const float *x, int64_t x_stride, int32_t rows, int32_t in, const uint16_t *perm,
                            int8_t *xq, float *dx) {
  int32_t groups = (in + 15) / 16;
  float *xsum = malloc(sizeof(float) * groups);
  for (int32_t t = 0; t < rows; t++)
    quantize_row(x + t * x_stride, in, perm, groups, NULL, xq + (int64_t)t * groups * 16,
                 dx + (int64_t)t * groups, xsum, NULL, NULL, NULL, NULL);
  free(xsum);
}

/* ---- epilogue: outliers (exact x) and bias ------------------------------------------------------------ */
SPQR_VEC_CLONES void spqr_mm_epilogue(const spqr_mm_args *a, int64_t r0, int64_t r1) {
  const spqr_weight *w = a->w;
  if (r1 > w->out_features) r1 = w->out_features;
  for (int32_t t = 0; t < a->rows; t++) {
    float *y = a->y + t * a->y_stride;
    const float *xs = a->xst + t * a->xst_stride;
    if (w->kind == SPQR_W_SPQR && w->outlier_row_ptr) {
      for (int64_t r = r0; r < r1; r++) {
        float acc = y[r];
        for (int32_t k = w->outlier_row_ptr[r]; k < w->outlier_row_ptr[r + 1]; k++)
          acc = fmaf(w->outlier_vals[k], xs[w->outlier_cols[k]], acc);
        y[r] = acc;
      }
    }
    if (w->bias)
      for (int64_t r = r0; r < r1; r++) y[r] += w->bias[r];
  }
}

/* ---- portable kernels ------------------------------------------------------------------------------- */
/* The codes of group j of a k-block, as quads q[4][64] (byte 4r + c: row r, column 4*quad + c). */
static void portable_codes(const uint8_t *c, int b, int j, uint8_t q[4][64]) {
  for (int i = 0; i < 4; i++) {
    int quad = 4 * j + i;
    for (int n = 0; n < 64; n++) {
      uint8_t v;
      if (b == 4) {
        v = (c[64 * (quad >> 1) + n] >> (4 * (quad & 1))) & 15;
      } else if (b == 2) {
        v = (c[64 * (quad >> 2) + n] >> (2 * (quad & 3))) & 3;
      } else {
        const uint8_t *A = c + 192 * (quad >> 3), *B = A + 64, *C = A + 128;
        switch (quad & 7) {
          case 0: v = A[n] & 7; break;
          case 1: v = (A[n] >> 3) & 7; break;
          case 2: v = (uint8_t)(((A[n] >> 6) & 3) | ((C[n] >> 4) & 4)); break;
          case 3: v = B[n] & 7; break;
          case 4: v = (B[n] >> 3) & 7; break;
          case 5: v = (uint8_t)(((B[n] >> 6) & 3) | ((C[n] >> 5) & 4)); break;
          case 6: v = C[n] & 7; break;
          default: v = (C[n] >> 3) & 7; break;
        }
      }
      q[i][n] = v;
    }
  }
}

/* Stat codes of group j (16 rows) from a k-block's stat section. */
static void portable_stats(const uint8_t *grp, int sb, int32_t sc[16], int32_t zc[16]) {
  for (int r = 0; r < 16; r++) {
    if (sb <= 4) {
      sc[r] = grp[r] & 15;
      zc[r] = grp[r] >> 4;
    } else {
      sc[r] = grp[r];
      zc[r] = grp[16 + r];
    }
  }
}

void spqr_mm_spqr_portable(const spqr_mm_args *a, int64_t rt0, int64_t rt1) {
  const spqr_weight *w = a->w;
  const int b = w->wbits, kbn = w->k_blocks;
  const int64_t cbytes = 128 * b, sbytes = spqr_cpu_stat_block_bytes(w->stat_bits);
  const int gbytes = spqr_stat_group_bytes(w->stat_bits);
  for (int64_t rt = rt0; rt < rt1; rt++) {
    for (int32_t t0 = 0; t0 < a->rows; t0 += SPQR_MAX_NT) {
      int nt = a->rows - t0 < SPQR_MAX_NT ? a->rows - t0 : SPQR_MAX_NT;
      float acc[SPQR_MAX_NT][16] = {{0}};
      for (int kb = 0; kb < kbn; kb++) {
        const uint8_t *codes = w->codes + (rt * kbn + kb) * cbytes;
        const uint8_t *st = w->stats + (rt * kbn + kb) * sbytes;
        const uint16_t *second = (const uint16_t *)(st + 4 * gbytes);
        for (int j = 0; j < 4; j++) {
          uint8_t q[4][64];
          int32_t sc[16], zc[16];
          portable_codes(codes, b, j, q);
          portable_stats(st + j * gbytes, w->stat_bits, sc, zc);
          float ss = spqr_half_to_float(second[4 * j]), zs = spqr_half_to_float(second[4 * j + 1]);
          float sz = spqr_half_to_float(second[4 * j + 2]), zz = spqr_half_to_float(second[4 * j + 3]);
          float s[16], z[16];
          for (int r = 0; r < 16; r++) {
            s[r] = fmaf((float)sc[r], ss, -(ss * zs));
            z[r] = fmaf((float)zc[r], sz, -(sz * zz));
          }
          for (int t = 0; t < nt; t++) {
            const int64_t xo = (t0 + t) * a->xq_stride + kb * 64 + 16 * j;
            const int8_t *xq = a->xq + xo, *xr = a->xq2 ? a->xq2 + xo : NULL;
            const int64_t gi = (t0 + t) * a->g_stride + kb * 4 + j;
            const float dx = a->dx[gi], X = a->xsum[gi];
            for (int r = 0; r < 16; r++) {
              int32_t d = 0, d2 = 0;
              for (int i = 0; i < 4; i++)
                for (int c = 0; c < 4; c++) {
                  d += (int32_t)q[i][4 * r + c] * xq[4 * i + c];
                  if (xr) d2 += (int32_t)q[i][4 * r + c] * xr[4 * i + c];
                }
              float u = fmaf((float)d, dx, -(z[r] * X));
              if (xr) u = fmaf((float)d2, a->dx2[gi], u);
              acc[t][r] = fmaf(s[r], u, acc[t][r]);
            }
          }
        }
      }
      for (int t = 0; t < nt; t++)
        for (int r = 0; r < 16 && 16 * rt + r < w->out_features; r++)
          a->y[(t0 + t) * a->y_stride + 16 * rt + r] = acc[t][r];
    }
    spqr_mm_epilogue(a, 16 * rt, 16 * rt + 16);
  }
}

void spqr_mm_q8_portable(const spqr_mm_args *a, int64_t rt0, int64_t rt1) {
  const spqr_weight *w = a->w;
  const int32_t kbn = w->k_blocks;
  for (int64_t rt = rt0; rt < rt1; rt++) {
    const uint8_t *tile = w->codes + rt * kbn * 16 * 64;
    const uint16_t *scales = w->scales + rt * kbn * 16;
    for (int32_t t = 0; t < a->rows; t++) {
      float acc[16] = {0};
      const int8_t *xq = a->xq + t * a->xq_stride;
      for (int32_t kb = 0; kb < kbn; kb++) {
        float blk[16] = {0};
        for (int32_t g = 4 * kb; g < 4 * kb + 4; g++) {
          const int64_t gi = t * a->g_stride + g;
          const int8_t *xq2 = a->xq2 + t * a->xq_stride;
          for (int r = 0; r < 16; r++) {
            int32_t d = 0, d2 = 0;
            for (int i = 0; i < 4; i++)
              for (int c = 0; c < 4; c++) {
                d += (int32_t)tile[(4 * g + i) * 64 + 4 * r + c] * xq[16 * g + 4 * i + c];
                d2 += (int32_t)tile[(4 * g + i) * 64 + 4 * r + c] * xq2[16 * g + 4 * i + c];
              }
            blk[r] = fmaf((float)(d - 128 * a->xqs[gi]), a->dx[gi], blk[r]);
            blk[r] = fmaf((float)(d2 - 128 * a->xqs2[gi]), a->dx2[gi], blk[r]);
          }
        }
        for (int r = 0; r < 16; r++) acc[r] = fmaf(blk[r], spqr_half_to_float(scales[16 * kb + r]), acc[r]);
      }
      for (int r = 0; r < 16 && 16 * rt + r < w->out_features; r++) a->y[t * a->y_stride + 16 * rt + r] = acc[r];
    }
    spqr_mm_epilogue(a, 16 * rt, 16 * rt + 16);
  }
}

void spqr_mm_dense_portable(const spqr_mm_args *a, int64_t r0, int64_t r1) {
  const spqr_weight *w = a->w;
  const int32_t in = w->in_features;
  for (int64_t r = r0; r < r1; r++) {
    for (int32_t t = 0; t < a->rows; t++) {
      const float *x = a->xst + t * a->xst_stride;
      float acc = 0.f;
      if (w->kind == SPQR_W_F32) {
        const float *row = (const float *)w->dense + r * in;
        for (int32_t k = 0; k < in; k++) acc = fmaf(row[k], x[k], acc);
      } else {
        const uint16_t *row = (const uint16_t *)w->dense + r * in;
        for (int32_t k = 0; k < in; k++) acc = fmaf(spqr_half_to_float(row[k]), x[k], acc);
      }
      a->y[t * a->y_stride + r] = acc;
    }
  }
  spqr_mm_epilogue(a, r0, r1);
}

/* ---- entry ----------------------------------------------------------------------------------------- */
typedef struct {
  const spqr_mm_args *a;
  spqr_mm_fn fn;
} mm_task_ctx;

static void mm_task(void *p, int64_t b, int64_t e) {
  const mm_task_ctx *c = p;
  c->fn(c->a, b, e);
}

typedef struct {
  const float *x;
  int64_t x_stride;
  const spqr_weight *w;
  spqr_mm_args *a;
  int32_t groups;
} quant_ctx;

static void quant_task(void *p, int64_t b, int64_t e) {
  const quant_ctx *c = p;
  const spqr_mm_args *a = c->a;
  for (int64_t t = b; t < e; t++)
    quantize_row(c->x + t * c->x_stride, c->w->in_features, c->w->kind == SPQR_W_SPQR ? c->w->perm : NULL,
                 c->groups, (float *)a->xst + t * a->xst_stride, (int8_t *)a->xq + t * a->xq_stride,
                 (float *)a->dx + t * a->g_stride, (float *)a->xsum + t * a->g_stride,
                 (int32_t *)a->xqs + t * a->g_stride, a->xq2 ? (int8_t *)a->xq2 + t * a->xq_stride : NULL,
                 a->xq2 ? (float *)a->dx2 + t * a->g_stride : NULL,
                 a->xq2 ? (int32_t *)a->xqs2 + t * a->g_stride : NULL);
}

static spqr_mm_fn pick(int kind) {
  int isa = spqr_cpu_isa();
#ifdef SPQR_HAVE_X86
  if (kind == SPQR_W_SPQR) return isa == SPQR_ISA_AVX512 ? spqr_mm_spqr_avx512 : isa == SPQR_ISA_AVX2 ? spqr_mm_spqr_avx2 : spqr_mm_spqr_portable;
  if (kind == SPQR_W_Q8) return isa == SPQR_ISA_AVX512 ? spqr_mm_q8_avx512 : isa == SPQR_ISA_AVX2 ? spqr_mm_q8_avx2 : spqr_mm_q8_portable;
  return isa >= SPQR_ISA_AVX2 ? spqr_mm_dense_avx2 : spqr_mm_dense_portable;
#else
  (void)isa;
  if (kind == SPQR_W_SPQR) return spqr_mm_spqr_portable;
  if (kind == SPQR_W_Q8) return spqr_mm_q8_portable;
  return spqr_mm_dense_portable;
#endif
}

int spqr_cpu_matmul(const spqr_weight *w, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                    int32_t rows) {
  if (rows <= 0) return 0;
  spqr_mm_args a = {.w = w, .rows = rows, .y = y, .y_stride = y_stride};
  mm_task_ctx task = {&a, pick(w->kind)};
  if (w->kind == SPQR_W_F32 || w->kind == SPQR_W_F16) {
    a.xst = x;
    a.xst_stride = x_stride;
    int64_t out = w->out_features;
    spqr_parallel_for(out, spqr_grain((out + 15) / 16, 4) * 16, mm_task, &task);
    return 0;
  }
  if (w->kind != SPQR_W_SPQR && w->kind != SPQR_W_Q8) return -1;
  const int32_t groups = 4 * w->k_blocks;
  const int64_t cols = 16 * (int64_t)groups;
  /* one scratch block: xst (fp32), dx, xsum (fp32), xq (int8), each row padded to whole groups */
  const int residual = w->kind == SPQR_W_Q8 || w->act_residual;
  size_t bytes = (size_t)rows * (cols * 4 + 5 * groups * 4 + 2 * cols) + 256;
  uint8_t *s = spqr_scratch(SPQR_SCRATCH_MATMUL, bytes);
  if (!s) return -1;
  a.xst = (float *)s;
  a.xst_stride = cols;
  a.dx = a.xst + rows * cols;
  a.xsum = a.dx + (int64_t)rows * groups;
  a.xqs = (const int32_t *)(a.xsum + (int64_t)rows * groups);
  a.g_stride = groups;
  a.dx2 = (const float *)(a.xqs + (int64_t)rows * groups);
  a.xqs2 = (const int32_t *)(a.dx2 + (int64_t)rows * groups);
  a.xq = (int8_t *)(a.xqs2 + (int64_t)rows * groups);
  a.xq2 = residual ? a.xq + (int64_t)rows * cols : NULL;
  a.xq_stride = cols;
  quant_ctx qc = {x, x_stride, w, &a, groups};
  spqr_parallel_for(rows, spqr_grain(rows, 2), quant_task, &qc);
  int64_t tiles = w->row_tiles;
  spqr_parallel_for(tiles, spqr_grain(tiles, 4), mm_task, &task);
  return 0;
}

#ifndef SPQR_SOURCE_HASH
#define SPQR_SOURCE_HASH "unknown"
#endif
/* The sha256 prefix of the sources this library was built from (spqr_run/cpu/build.py source_hash). */
const char *spqr_cpu_source_hash(void) { return SPQR_SOURCE_HASH; }
