/* spqr_matmul_avx512.c: the AVX-512 VNNI variant of the SpQR and Q8 matmuls (same arithmetic as the portable
 * code in spqr_matmul.c, bit for bit).
 *
 * A zmm register holds one quad: 16 rows x 4 columns of u8 codes, one row per 32-bit lane. vpdpbusd with the
 * 4 activation bytes of those columns broadcast to every lane adds 16 rows' partial dot products at once, so
 * a 16 x 16 group is 4 vpdpbusd per activation row, and the per-group statistics are vectors over the 16
 * rows too (no horizontal reduction anywhere). One pass over a row tile's codes serves up to 8 activation
 * rows (the codes are unpacked once for all of them).
 */
#include "spqr_internal.h"

#ifdef SPQR_HAVE_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
#endif
#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))

INLINE __m512i bcast4(const int8_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

/* The exact integer dot products of a group's 16 rows (four quads) with 16 activation bytes: 16 int32 lanes. */
INLINE __m512i group_dot(__m512i q0, __m512i q1, __m512i q2, __m512i q3, const int8_t *x) {
  __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q0, bcast4(x));
  d = _mm512_dpbusd_epi32(d, q1, bcast4(x + 4));
  d = _mm512_dpbusd_epi32(d, q2, bcast4(x + 8));
  return _mm512_dpbusd_epi32(d, q3, bcast4(x + 12));
}

/* q[i] = quad 4j + i of a k-block's codes, as u8 (byte 4r + c = row r, column 4(4j+i) + c). */
INLINE void group_codes(const uint8_t *c, const int b, const int j, __m512i q[4]) {
  if (b == 4) {
    const __m512i m = _mm512_set1_epi8(0x0F);
    const __m512i x = _mm512_loadu_si512(c + 128 * j), y = _mm512_loadu_si512(c + 128 * j + 64);
    q[0] = _mm512_and_si512(x, m);
    q[1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m);
    q[2] = _mm512_and_si512(y, m);
    q[3] = _mm512_and_si512(_mm512_srli_epi16(y, 4), m);
  } else if (b == 2) {
    const __m512i m = _mm512_set1_epi8(3);
    const __m512i x = _mm512_loadu_si512(c + 64 * j);
    q[0] = _mm512_and_si512(x, m);
    q[1] = _mm512_and_si512(_mm512_srli_epi16(x, 2), m);
    q[2] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m);
    q[3] = _mm512_and_si512(_mm512_srli_epi16(x, 6), m);
  } else {
    const __m512i m7 = _mm512_set1_epi8(7), m3 = _mm512_set1_epi8(3);
    const uint8_t *base = c + 192 * (j >> 1);
    const __m512i A = _mm512_loadu_si512(base), B = _mm512_loadu_si512(base + 64),
                  C = _mm512_loadu_si512(base + 128);
    /* (a & 3) | (c & ~3), then & 7: bit 2 from C, bits 0-1 from A (ternary-logic select, imm 0xE4) */
    if ((j & 1) == 0) {
      q[0] = _mm512_and_si512(A, m7);
      q[1] = _mm512_and_si512(_mm512_srli_epi16(A, 3), m7);
      q[2] = _mm512_and_si512(
          _mm512_ternarylogic_epi32(_mm512_srli_epi16(A, 6), _mm512_srli_epi16(C, 4), m3, 0xE4), m7);
      q[3] = _mm512_and_si512(B, m7);
    } else {
      q[0] = _mm512_and_si512(_mm512_srli_epi16(B, 3), m7);
      q[1] = _mm512_and_si512(
          _mm512_ternarylogic_epi32(_mm512_srli_epi16(B, 6), _mm512_srli_epi16(C, 5), m3, 0xE4), m7);
      q[2] = _mm512_and_si512(C, m7);
      q[3] = _mm512_and_si512(_mm512_srli_epi16(C, 3), m7);
    }
  }
}

/* The 16 rows' scale and zero codes of one group, as fp32. */
INLINE void group_stats(const uint8_t *grp, const int nibbles, __m512 *sc, __m512 *zc) {
  if (nibbles) { /* byte r = scale code | zero code << 4 */
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)grp));
    *sc = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    *zc = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  } else {
    *sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)grp)));
    *zc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(grp + 16))));
  }
}

/* Row tile `rt`, activation rows t0 .. t0 + NT - 1: y = codes x activations (outliers, bias: epilogue). */
INLINE void spqr_tile(const spqr_mm_args *a, const int64_t rt, const int32_t t0, const int NT, const int b,
                      const int nibbles, const int res) {
  const spqr_weight *w = a->w;
  const int kbn = w->k_blocks;
  const int64_t cbytes = 128 * b;
  const int gbytes = nibbles ? 16 : 32, sbytes = 4 * gbytes + 32;
  const uint8_t *codes = w->codes + rt * kbn * cbytes, *stats = w->stats + rt * kbn * sbytes;
  const int8_t *xq[NT];
  const float *dx[NT], *xs[NT];
  _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {
    xq[t] = a->xq + (t0 + t) * a->xq_stride;
    dx[t] = a->dx + (t0 + t) * a->g_stride;
    xs[t] = a->xsum + (t0 + t) * a->g_stride;
  }
  __m512 acc[NT];
  _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
  for (int kb = 0; kb < kbn; kb++, codes += cbytes, stats += sbytes) {
    /* second-order numbers of the 4 groups: P = [ss zs sz zz] x 4, P * swap(P) = [ss*zs . sz*zz .] (exact).
     * Kept in memory (the asm barrier) so that each is an embedded broadcast operand, not a permute. */
    float pq[32];
    const __m512 P = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(stats + 4 * gbytes)));
    _mm512_storeu_ps(pq, P);
    _mm512_storeu_ps(pq + 16, _mm512_mul_ps(P, _mm512_permute_ps(P, 0xB1)));
    __asm__ volatile("" : "+m"(*(float(*)[32])pq));
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
      __m512i q[4];
      __m512 sc, zc;
      group_codes(codes, b, j, q);
      group_stats(stats + j * gbytes, nibbles, &sc, &zc);
      const __m512 s = _mm512_fmsub_ps(sc, _mm512_set1_ps(pq[4 * j]), _mm512_set1_ps(pq[16 + 4 * j + 1]));
      const __m512 z = _mm512_fmsub_ps(zc, _mm512_set1_ps(pq[4 * j + 2]), _mm512_set1_ps(pq[16 + 4 * j + 3]));
      const int64_t k = kb * 64 + 16 * j, g = kb * 4 + j;
      _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {
        const __m512i d = group_dot(q[0], q[1], q[2], q[3], xq[t] + k);
        const __m512 zx = _mm512_mul_ps(z, _mm512_set1_ps(xs[t][g]));
        __m512 u = _mm512_fmsub_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(dx[t][g]), zx);
        if (res) { /* the activation residual, step dx2 */
          const __m512i e = group_dot(q[0], q[1], q[2], q[3], a->xq2 + (t0 + t) * a->xq_stride + k);
          u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(a->dx2[(t0 + t) * a->g_stride + g]), u);
        }
        acc[t] = _mm512_fmadd_ps(s, u, acc[t]);
      }
    }
  }
  const int64_t left = w->out_features - 16 * rt;
  const __mmask16 keep = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
  _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++)
    _mm512_mask_storeu_ps(a->y + (t0 + t) * a->y_stride + 16 * rt, keep, acc[t]);
}

#define NT_CASES(B, N)                                          \
  const int res = a->xq2 != NULL;                               \
  switch (nt) {                                                 \
    case 1: spqr_tile(a, rt, t0, 1, B, N, res); break;          \
    case 2: spqr_tile(a, rt, t0, 2, B, N, res); break;          \
    case 3: spqr_tile(a, rt, t0, 3, B, N, res); break;          \
    case 4: spqr_tile(a, rt, t0, 4, B, N, res); break;          \
    case 5: spqr_tile(a, rt, t0, 5, B, N, res); break;          \
    case 6: spqr_tile(a, rt, t0, 6, B, N, res); break;          \
    case 7: spqr_tile(a, rt, t0, 7, B, N, res); break;          \
    default: spqr_tile(a, rt, t0, 8, B, N, res); break;         \
  }

typedef void (*tile_fn)(const spqr_mm_args *, int64_t, int32_t, int);
static void tile_b4n(const spqr_mm_args *a, int64_t rt, int32_t t0, int nt) { NT_CASES(4, 1) }
static void tile_b3n(const spqr_mm_args *a, int64_t rt, int32_t t0, int nt) { NT_CASES(3, 1) }
static void tile_b2n(const spqr_mm_args *a, int64_t rt, int32_t t0, int nt) { NT_CASES(2, 1) }
static void tile_b4(const spqr_mm_args *a, int64_t rt, int32_t t0, int nt) { NT_CASES(4, 0) }
static void tile_b3(const spqr_mm_args *a, int64_t rt, int32_t t0, int nt) { NT_CASES(3, 0) }
static void tile_b2(const spqr_mm_args *a, int64_t rt, int32_t t0, int nt) { NT_CASES(2, 0) }

void spqr_mm_spqr_avx512(const spqr_mm_args *a, int64_t rt0, int64_t rt1) {
  static const tile_fn tiles[2][3] = {{tile_b2, tile_b3, tile_b4}, {tile_b2n, tile_b3n, tile_b4n}};
  const tile_fn tile = tiles[a->w->stat_bits <= 4][a->w->wbits - 2];
  for (int64_t rt = rt0; rt < rt1; rt++) {
    for (int32_t t0 = 0; t0 < a->rows; t0 += SPQR_MAX_NT) {
      int nt = a->rows - t0 < SPQR_MAX_NT ? a->rows - t0 : SPQR_MAX_NT;
      tile(a, rt, t0, nt);
    }
    spqr_mm_epilogue(a, 16 * rt, 16 * rt + 16);
  }
}

/* ---- Q8 (embedding / LM head): u8 codes = w + 128, an fp16 scale per row and 64 columns ---------------- */
INLINE void q8_tile(const spqr_mm_args *a, const int64_t rt, const int32_t t0, const int NT) {
  const spqr_weight *w = a->w;
  const int32_t kbn = w->k_blocks;
  const uint8_t *tile = w->codes + rt * kbn * 16 * 64;
  const uint16_t *scales = w->scales + rt * kbn * 16;
  __m512 acc[NT];
  _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
  for (int32_t kb = 0; kb < kbn; kb++) {
    __m512 blk[NT];
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) blk[t] = _mm512_setzero_ps();
    for (int32_t g = 4 * kb; g < 4 * kb + 4; g++, tile += 256) {
      const __m512i q0 = _mm512_loadu_si512(tile), q1 = _mm512_loadu_si512(tile + 64),
                    q2 = _mm512_loadu_si512(tile + 128), q3 = _mm512_loadu_si512(tile + 192);
      _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {
        const int8_t *xq = a->xq + (t0 + t) * a->xq_stride + 16 * g;
        const int64_t gi = (t0 + t) * a->g_stride + g;
        __m512i d = _mm512_sub_epi32(group_dot(q0, q1, q2, q3, xq), _mm512_set1_epi32(128 * a->xqs[gi]));
        blk[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(a->dx[gi]), blk[t]);
        const int8_t *xr = a->xq2 + (t0 + t) * a->xq_stride + 16 * g; /* the activation residual */
        const __m512i e = _mm512_sub_epi32(group_dot(q0, q1, q2, q3, xr), _mm512_set1_epi32(128 * a->xqs2[gi]));
        blk[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(a->dx2[gi]), blk[t]);
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 16 * kb)));
    _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) acc[t] = _mm512_fmadd_ps(blk[t], s, acc[t]);
  }
  const int64_t left = w->out_features - 16 * rt;
  const __mmask16 keep = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
  _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(a->y + (t0 + t) * a->y_stride + 16 * rt, keep, acc[t]);
}

void spqr_mm_q8_avx512(const spqr_mm_args *a, int64_t rt0, int64_t rt1) {
  for (int64_t rt = rt0; rt < rt1; rt++) {
    for (int32_t t0 = 0; t0 < a->rows; t0 += SPQR_MAX_NT) {
      switch (a->rows - t0 < SPQR_MAX_NT ? a->rows - t0 : SPQR_MAX_NT) {
        case 1: q8_tile(a, rt, t0, 1); break;
        case 2: q8_tile(a, rt, t0, 2); break;
        case 3: q8_tile(a, rt, t0, 3); break;
        case 4: q8_tile(a, rt, t0, 4); break;
        case 5: q8_tile(a, rt, t0, 5); break;
        case 6: q8_tile(a, rt, t0, 6); break;
        case 7: q8_tile(a, rt, t0, 7); break;
        default: q8_tile(a, rt, t0, 8); break;
      }
    }
    spqr_mm_epilogue(a, 16 * rt, 16 * rt + 16);
  }
}

#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif /* SPQR_HAVE_X86 */
