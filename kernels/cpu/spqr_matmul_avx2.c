/* spqr_matmul_avx2.c: the AVX2 + FMA + F16C variant (bit-identical SpQR / Q8 results to the portable code),
 * and the dense fp32 / fp16 matmul for every x86 ISA.
 *
 * A quad (64 bytes) is two ymm halves: rows 0-7 and rows 8-15. The integer dot product of a 16 x 16 group is
 * vpmaddubsw (u8 codes x s8 activations, pairs summed in 16 bits: at most 4 * 2 * 15 * 127 = 15240 after the
 * four quads, no saturation), then one vpmaddwd by ones into 32-bit lanes. Q8 codes (up to 255) would
 * saturate that, so Q8 takes |w| and the activation with w's sign (the signed dot equals VNNI's minus 128*sum).
 */
#include <math.h>

#include "spqr_internal.h"

#ifdef SPQR_HAVE_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))
#define NT_MAX 4 /* 16 ymm registers: two accumulators per activation row */

typedef struct {
  __m256i lo, hi;
} quad;

INLINE __m256i bcast4(const int8_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

INLINE quad load_quad(const uint8_t *p) {
  quad q = {_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)(p + 32))};
  return q;
}

INLINE quad qand(quad x, __m256i m) {
  quad q = {_mm256_and_si256(x.lo, m), _mm256_and_si256(x.hi, m)};
  return q;
}

INLINE quad qsrl(quad x, int n) {
  quad q = {_mm256_srli_epi16(x.lo, n), _mm256_srli_epi16(x.hi, n)};
  return q;
}

INLINE quad qor(quad x, quad y) {
  quad q = {_mm256_or_si256(x.lo, y.lo), _mm256_or_si256(x.hi, y.hi)};
  return q;
}

INLINE void group_codes(const uint8_t *c, const int b, const int j, quad q[4]) {
  if (b == 4) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    const quad x = load_quad(c + 128 * j), y = load_quad(c + 128 * j + 64);
    q[0] = qand(x, m);
    q[1] = qand(qsrl(x, 4), m);
    q[2] = qand(y, m);
    q[3] = qand(qsrl(y, 4), m);
  } else if (b == 2) {
    const __m256i m = _mm256_set1_epi8(3);
    const quad x = load_quad(c + 64 * j);
    q[0] = qand(x, m);
    q[1] = qand(qsrl(x, 2), m);
    q[2] = qand(qsrl(x, 4), m);
    q[3] = qand(qsrl(x, 6), m);
  } else {
    const __m256i m7 = _mm256_set1_epi8(7), m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
    const uint8_t *base = c + 192 * (j >> 1);
    const quad A = load_quad(base), B = load_quad(base + 64), C = load_quad(base + 128);
    if ((j & 1) == 0) {
      q[0] = qand(A, m7);
      q[1] = qand(qsrl(A, 3), m7);
      q[2] = qor(qand(qsrl(A, 6), m3), qand(qsrl(C, 4), m4));
      q[3] = qand(B, m7);
    } else {
      q[0] = qand(qsrl(B, 3), m7);
      q[1] = qor(qand(qsrl(B, 6), m3), qand(qsrl(C, 5), m4));
      q[2] = qand(C, m7);
      q[3] = qand(qsrl(C, 3), m7);
    }
  }
}

INLINE void group_stats(const uint8_t *grp, const int nibbles, __m256 sc[2], __m256 zc[2]) {
  for (int h = 0; h < 2; h++) { /* rows 8h .. 8h+7 */
    if (nibbles) { /* byte r = scale code | zero code << 4 */
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(grp + 8 * h)));
      sc[h] = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
      zc[h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    } else {
      sc[h] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(grp + 8 * h))));
      zc[h] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(grp + 16 + 8 * h))));
    }
  }
}

/* Exact sum_i quad_i . x_i of one half (8 rows) into 32-bit lanes. */
INLINE __m256i half_dot(__m256i q0, __m256i q1, __m256i q2, __m256i q3, const int8_t *xq) {
  __m256i s = _mm256_maddubs_epi16(q0, bcast4(xq));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q1, bcast4(xq + 4)));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q2, bcast4(xq + 8)));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(q3, bcast4(xq + 12)));
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

INLINE void spqr_tile(const spqr_mm_args *a, const int64_t rt, const int32_t t0, const int NT, const int b) {
  const spqr_weight *w = a->w;
  const int kbn = w->k_blocks, nibbles = w->stat_bits <= 4;
  const int64_t cbytes = 128 * b, sbytes = spqr_cpu_stat_block_bytes(w->stat_bits);
  const int gbytes = spqr_stat_group_bytes(w->stat_bits);
  const uint8_t *codes = w->codes + rt * kbn * cbytes, *stats = w->stats + rt * kbn * sbytes;
  __m256 acc[NT][2];
  for (int t = 0; t < NT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int kb = 0; kb < kbn; kb++, codes += cbytes, stats += sbytes) {
    float p[16];
    const __m128i *sec = (const __m128i *)(stats + 4 * gbytes);
    _mm256_storeu_ps(p, _mm256_cvtph_ps(_mm_loadu_si128(sec)));
    _mm256_storeu_ps(p + 8, _mm256_cvtph_ps(_mm_loadu_si128(sec + 1)));
    for (int j = 0; j < 4; j++) {
      quad q[4];
      __m256 sc[2], zc[2], s[2], z[2];
      group_codes(codes, b, j, q);
      group_stats(stats + j * gbytes, nibbles, sc, zc);
      const float ss = p[4 * j], sz = p[4 * j + 2], sszs = ss * p[4 * j + 1], szzz = sz * p[4 * j + 3];
      for (int h = 0; h < 2; h++) {
        s[h] = _mm256_fmsub_ps(sc[h], _mm256_set1_ps(ss), _mm256_set1_ps(sszs));
        z[h] = _mm256_fmsub_ps(zc[h], _mm256_set1_ps(sz), _mm256_set1_ps(szzz));
      }
      _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {
        const int8_t *xq = a->xq + (t0 + t) * a->xq_stride + kb * 64 + 16 * j;
        const int64_t gi = (t0 + t) * a->g_stride + kb * 4 + j;
        const __m256 X = _mm256_set1_ps(a->xsum[gi]), dx = _mm256_set1_ps(a->dx[gi]);
        const __m256i d[2] = {half_dot(q[0].lo, q[1].lo, q[2].lo, q[3].lo, xq),
                              half_dot(q[0].hi, q[1].hi, q[2].hi, q[3].hi, xq)};
        __m256i e[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        if (a->xq2) { /* the activation residual, step dx2 */
          const int8_t *xr = a->xq2 + (t0 + t) * a->xq_stride + kb * 64 + 16 * j;
          e[0] = half_dot(q[0].lo, q[1].lo, q[2].lo, q[3].lo, xr);
          e[1] = half_dot(q[0].hi, q[1].hi, q[2].hi, q[3].hi, xr);
        }
        for (int h = 0; h < 2; h++) {
          __m256 u = _mm256_fmsub_ps(_mm256_cvtepi32_ps(d[h]), dx, _mm256_mul_ps(z[h], X));
          if (a->xq2) u = _mm256_fmadd_ps(_mm256_cvtepi32_ps(e[h]), _mm256_set1_ps(a->dx2[gi]), u);
          acc[t][h] = _mm256_fmadd_ps(s[h], u, acc[t][h]);
        }
      }
    }
  }
  const int64_t left = w->out_features - 16 * rt;
  for (int t = 0; t < NT; t++) {
    float *y = a->y + (t0 + t) * a->y_stride + 16 * rt;
    if (left >= 16) {
      _mm256_storeu_ps(y, acc[t][0]);
      _mm256_storeu_ps(y + 8, acc[t][1]);
    } else {
      float tmp[16];
      _mm256_storeu_ps(tmp, acc[t][0]);
      _mm256_storeu_ps(tmp + 8, acc[t][1]);
      for (int r = 0; r < left; r++) y[r] = tmp[r];
    }
  }
}

#define NT_CASES(B)                            \
  switch (nt) {                                \
    case 1: spqr_tile(a, rt, t0, 1, B); break; \
    case 2: spqr_tile(a, rt, t0, 2, B); break; \
    case 3: spqr_tile(a, rt, t0, 3, B); break; \
    default: spqr_tile(a, rt, t0, 4, B); break; \
  }

static void tile_b4(const spqr_mm_args *a, int64_t rt, int32_t t0, int nt) { NT_CASES(4) }
static void tile_b3(const spqr_mm_args *a, int64_t rt, int32_t t0, int nt) { NT_CASES(3) }
static void tile_b2(const spqr_mm_args *a, int64_t rt, int32_t t0, int nt) { NT_CASES(2) }

void spqr_mm_spqr_avx2(const spqr_mm_args *a, int64_t rt0, int64_t rt1) {
  void (*tile)(const spqr_mm_args *, int64_t, int32_t, int) =
      a->w->wbits == 4 ? tile_b4 : a->w->wbits == 3 ? tile_b3 : tile_b2;
  for (int64_t rt = rt0; rt < rt1; rt++) {
    for (int32_t t0 = 0; t0 < a->rows; t0 += NT_MAX) tile(a, rt, t0, a->rows - t0 < NT_MAX ? a->rows - t0 : NT_MAX);
    spqr_mm_epilogue(a, 16 * rt, 16 * rt + 16);
  }
}

/* ---- Q8 ------------------------------------------------------------------------------------------- */
INLINE __m256i q8_half_dot(const uint8_t *tile, int h, const int8_t *xq) {
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  __m256i d = _mm256_setzero_si256();
  for (int i = 0; i < 4; i++) {
    const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(tile + 64 * i + 32 * h)), flip);
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(bcast4(xq + 4 * i), w));
    d = _mm256_add_epi32(d, _mm256_madd_epi16(p, ones));
  }
  return d;
}

void spqr_mm_q8_avx2(const spqr_mm_args *a, int64_t rt0, int64_t rt1) {
  const spqr_weight *w = a->w;
  const int32_t kbn = w->k_blocks;
  for (int64_t rt = rt0; rt < rt1; rt++) {
    const int64_t left = w->out_features - 16 * rt;
    const uint16_t *scales = w->scales + rt * kbn * 16;
    for (int32_t t = 0; t < a->rows; t++) {
      const uint8_t *tile = w->codes + rt * kbn * 16 * 64;
      __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int32_t kb = 0; kb < kbn; kb++) {
        __m256 blk[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int32_t g = 4 * kb; g < 4 * kb + 4; g++, tile += 256) {
          const int8_t *xq = a->xq + t * a->xq_stride + 16 * g, *xr = a->xq2 + t * a->xq_stride + 16 * g;
          const __m256 dx = _mm256_set1_ps(a->dx[t * a->g_stride + g]);
          const __m256 dx2 = _mm256_set1_ps(a->dx2[t * a->g_stride + g]);
          for (int h = 0; h < 2; h++) {
            blk[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_half_dot(tile, h, xq)), dx, blk[h]);
            blk[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_half_dot(tile, h, xr)), dx2, blk[h]);
          }
        }
        for (int h = 0; h < 2; h++) {
          const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 16 * kb + 8 * h)));
          acc[h] = _mm256_fmadd_ps(blk[h], s, acc[h]);
        }
      }
      float tmp[16];
      _mm256_storeu_ps(tmp, acc[0]);
      _mm256_storeu_ps(tmp + 8, acc[1]);
      float *y = a->y + t * a->y_stride + 16 * rt;
      for (int r = 0; r < 16 && r < left; r++) y[r] = tmp[r];
    }
    spqr_mm_epilogue(a, 16 * rt, 16 * rt + 16);
  }
}

/* ---- dense fp32 / fp16 (the FP16 baseline, GGUF and Hugging Face sources) -------------------------- */
INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

INLINE __m256 load8(const void *w, const int f16, int64_t i) {
  return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)))
             : _mm256_loadu_ps((const float *)w + i);
}

/* One weight row x activation rows t0 .. t0+NT-1, four independent accumulators per activation row (the FMA
 * chain never waits on its own latency); the row is read once, front to back (one stream). */
INLINE void dense_row(const spqr_mm_args *a, int64_t r, int32_t t0, const int NT, const int f16) {
  const spqr_weight *w = a->w;
  const int32_t in = w->in_features, in32 = in & ~31, in8 = in & ~7;
  __m256 acc[NT][4];
  _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[t][i] = _mm256_setzero_ps();
  const int64_t base = r * in;
  int32_t k = 0;
  for (; k < in32; k += 32) {
    __m256 wv[4];
    _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) wv[i] = load8(w->dense, f16, base + k + 8 * i);
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
      const float *x = a->xst + (t0 + t) * a->xst_stride + k;
      _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[t][i] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(x + 8 * i), acc[t][i]);
    }
  }
  for (; k < in8; k += 8) {
    const __m256 wv = load8(w->dense, f16, base + k);
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a->xst + (t0 + t) * a->xst_stride + k), acc[t][0]);
  }
  for (int t = 0; t < NT; t++) {
    float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
    const float *x = a->xst + (t0 + t) * a->xst_stride;
    for (int32_t j = in8; j < in; j++)
      s = fmaf(f16 ? spqr_half_to_float(((const uint16_t *)w->dense)[base + j]) : ((const float *)w->dense)[base + j], x[j], s);
    a->y[(t0 + t) * a->y_stride + r] = s;
  }
}

void spqr_mm_dense_avx2(const spqr_mm_args *a, int64_t r0, int64_t r1) {
  const int f16 = a->w->kind == SPQR_W_F16;
  if (r1 > a->w->out_features) r1 = a->w->out_features;
  for (int64_t r = r0; r < r1; r++) {
    for (int32_t t0 = 0; t0 < a->rows; t0 += 2) {
      if (a->rows - t0 >= 2) f16 ? dense_row(a, r, t0, 2, 1) : dense_row(a, r, t0, 2, 0);
      else f16 ? dense_row(a, r, t0, 1, 1) : dense_row(a, r, t0, 1, 0);
    }
  }
  spqr_mm_epilogue(a, r0, r1);
}

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif /* SPQR_HAVE_X86 */
