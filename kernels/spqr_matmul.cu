// SpQR v2 kernels: the small-batch tensor-core matmul (1..16 activation rows) and the one-launch dequantization
// used by prefill (fp16 W, then cuBLAS). Device code only (no torch, no host code), sm_80+; the parameter structs
// are in spqr_matmul.h, and the Python launcher (spqr_run/gpu/spqr_matmul.py) plans, builds the argument block
// and calls cuLaunchKernel on cubins built by nvcc or NVRTC (spqr_run/gpu/build.py). The reference they must
// match: spqr_run/quant/spqr_matmul.py; the layout: spqr_run/quant/tile_layout.py.
//
// ==== Design (issue #11; KERNELS_V2_SPEC.md) =====================================================================
//
// Work split. A block is 4 warps = 4 consecutive row tiles (64 output rows) x one k-range of records; warp w owns
// row tile 4*blockIdx.x + w and walks the records kb0..kb1-1 of that row tile (one contiguous run of memory).
// Grid (ceil(RT/4), S): S splits the KB records of a row tile into near-equal k-ranges (sizes differ by at most
// one record, so S need not divide KB). S is chosen by the launcher (spqr_run/gpu/spqr_matmul.py, small_plan)
// from the SM count and the kernel's resident blocks per SM (both from the device): the smallest S <= 32 minimising
//   waves(S) * (ceil(KB / S) + 2) + [S > 1],   waves(S) = ceil(ceil(RT/4) * S / (SMs * blocks per SM)),
// (2: a block's pipeline fill, in record times; 1: the reduction), i.e. whole waves of equal-length blocks. On
// 132 SMs x 9 blocks every LLaMA-7B..65B / Falcon-7B/40B shape gets one wave filling 86-97% of the block slots
// (4096x4096: S = 16, 1024 blocks of 4 records; 8192x8192: S = 9; 22016x8192: S = 3).
//
// Pipeline. kStages = 3 stages of shared memory, each = the 4 warps' kRecs = 2 records of two consecutive
// k-blocks (4 x 2R words) + the 128 columns of x_stored for them (rows x 128 fp16, rows padded to 136 halves so
// ldmatrix is free of bank conflicts): the barrier, the stage control and the x copy are paid once per 64 weights
// a lane. Every byte moves by 16-byte cp.async (cp.async.cg: L2 only): the warp's two records are one contiguous
// run of memory, lane c of warp w copies 16-byte chunks c, c + 32, ... of it (only the first record's chunks when
// the second is past the k-range's end), threads copy the 16-byte chunks of x (one each for 8 rows; rows >=
// `rows` are not copied, x is read in whole records: callers pad its rows to 64 columns). kStages - 1 stages are
// in flight while one is decoded. In the steady state (rounds of kStages stages whose refills are all full) the
// copies are unrolled with constant offsets from per-round source pointers: no address arithmetic, no tests.
// Bytes in flight per SM (3-bit weights, 3-bit stats, 464-byte records, 6 resident blocks on sm_80):
//   2 stages x 2 records x 4 warps x 464 B x 6 blocks = 45 KB of weights (+ x), above the ~20-30 KB an H200
//   needs (4.8 TB/s x ~600 ns latency / 132 SMs = 22 KB); with 4 resident blocks (sm_86/89) 30 KB.
// x is read from L2 once per block (4 row tiles), not once per warp.
//
// Dequantization in registers, per lane and record (lane L, g = L >> 2, t = L & 3; 32 weights = 4 tiles x the
// A fragment a0..a3, each a half2 pair of one row):
//   stats, in fp16x2 (row g, row g+8): lane 4g+t decodes group t: its 4 stat codes (one funnel shift of the stat
//   bit string) are spread into the two halves (one select) and masked into the mantissa of fp16 1024 (one LOP3
//   each, then -1024: exact integers); with the group's second-order numbers (s_scale, z_scale, s_zero, z_zero)
//   it computes s' = s_scale * 2^(12-k), S12 = fma(scale code, s', -z_scale * s') = scale * 2^(12-k), zero =
//   fma(zero code, s_zero, -z_zero * s_zero) and C = (S12 * -2^-12) * zero = -scale*zero * 2^-k, each an fp16x2
//   operation (HMUL2/HFMA2, one rounding each), and publishes (S, C) to its quad through 8 bytes of shared
//   memory (one 8-byte store, a __syncwarp, two 16-byte loads: lane 4g+j holds group j), S = S12 * 2^(12-p') =
//   S0 * 2^-p' (S0 = scale * 2^(24-k)) for the bit position p' at which group t's pairs of row g and of row g+8
//   are read (below; one HMUL2).
//   codes, per pair (two codes of one row): v = word & mask, with the pair's bits at [p', p'+B) of each half: a
//   half with a zero exponent field is the subnormal code * 2^(p'-24), exactly, no offset to remove; a = fma(v,
//   S, C) as one HFMA2 with the row's S and C broadcast = 2^-k * (code * S + C). 4-bit: p' = 0 for row g, 4 for
//   row g+8 (one shift a word); 3-bit (format 3): five codes a half, at bits 0, 3, 6 and, after one shift of
//   the word by 9, 9, 12, so p' = 0, 3, 6, plus a 16th pair spread over the three words' bit 15 (five
//   instructions), with p' shared by a row's pairs in a tile (tile_layout.CODE3_ROW_EXPONENTS); 2-bit: p' = 0
//   or 4 by column half, so there each tile scales S0 by 2^-4 itself.
//   The weight exponent k (per warp and k-range, from the second-order numbers of its records: scale <= bound
//   < 2^e, k = e + 9, clamped to [-3, 24]) keeps S0 < 2^15 (fp16 max 65504); the accumulators are multiplied by
//   2^k (exact) before they leave the warp, the outlier seeds by 2^-k. (With the fp16 magic number 1024 instead,
//   the offset had to be removed by a second HFMA2 per pair: folded into C it would lose half a code step to
//   fp16 rounding.)
// mma. Per tile and n-tile of 8 activation rows: one mma.m16n8k16 (fp16 in, fp32 accumulate) with B fragments
// from ldmatrix.x4 (two tiles per ldmatrix). The accumulator runs over all records of the k-range.
//
// Outliers (the row tile's contiguous run of packed words): loaded at kernel start, while the first stages are
// in flight; lane (r = L & 15, h = L >> 4) takes row r's entries p = start + split + S*(h + 2i); its fp32 sums
// (value * x_stored[b, column], exact products) are combined by one shuffle and seed the mma accumulators. No
// pointer chase after the dense part.
//
// Reduction (S > 1): each block writes its fp32 partial fragments to the workspace, fences, and takes an integer
// ticket (atomicAdd on its row-tile group's counter); the block that draws the last ticket sums the S partials
// in split order 0..S-1 (the order never depends on which block finishes last: bit-identical runs), adds the
// bias in fp32, rounds once to fp16 and resets the counter to 0. S = 1 writes y directly.
//
// Numerics (u = 2^-11, the fp16 unit roundoff; S = scale, Z = zero, q = code; tests/test_kernels.py emulates
// every operation): |w_kernel - w_ref| <= u ((|q| + |Z|)(|S| + |s_scale z_scale|) + |S| (2|Z| + |s_zero z_zero|)
// + |w_ref|) (1 + 8u) + 2^(k-20): the roundings of S (relative to |S| + |s_scale z_scale|: no cancellation when
// z_scale <= 0, as min-max statistics give), Z, C and w'', plus fp16 subnormal results below 2^(k-14). Products
// and sums fp32. The dequantize kernel takes k per record and writes fp16(w'' * 2^k) plus the outlier delta
// (one more fp16 rounding).
//
// SASS of the shipped cubins (nvcc 13.0 -O3 -cubin, spqr_run/gpu/build.py), hot loop = the unrolled steady-state
// loop (3 stages x 2 records = 192 weights per thread), thread instructions per weight / registers / resident
// blocks per SM (x 4 warps); no spills, no local memory (benchmarks/sass_report.py):
//                     sm_80              sm_86, sm_89       sm_90
//   W3 SB3, 1-8 rows  2.39 / 81 / 5      2.39 / 81 / 4      2.36 / 83 / 5
//   W3 SB3, 9-16 rows 2.60 / 98 / 4      2.60 / 98 / 3      2.59 / 108 / 4
//   W4 SB3, 1-8 rows  2.28 / 76 / 6      2.28 / 76 / 3      2.26 / 78 / 6
//   W4 SB3, 9-16 rows 2.47 / 91 / 4      2.47 / 91 / 2      2.46 / 94 / 5
//   W2 SB3, 1-8 rows  2.44 / 80 / 6      2.44 / 80 / 5      2.43 / 80 / 6
// (issue 22's 32-bit shared addresses, for NVRTC: 2.38 / 81, 2.62 / 96 (5 blocks on sm_80), 2.28, 2.54, 2.44
// before. NVRTC 13.0's cubins of this source: within 0.5% and 4 registers of these at 1-8 rows; at 9-16 rows
// 2-/3-bit within 0.4% on sm_80-89, sm_90 3-bit +1.2%, 4-bit +1.5-1.7% / +4-6: sass_report.py --compare.)
// (session 4's kernel: 4.03, 4.52, 3.72, 4.23, 3.67 on sm_80; format 2's: 2.76, 3.09, 2.38, 2.77, 2.51.) Per
// record and thread (32 weights), W3 SB3 sm_80, 76 instructions: 16 HFMA2 (one per pair) + 18 LOP3 + 5 shifts
// (codes), 18 for the stats (6 HMUL2, 2 HFMA2, 2 HADD2, 3 LOP3, 3 shifts and the funnel, 2 loads), 4 HMMA + 2
// LDSM, 6 more shared-memory loads and stores (codes 2, the quad exchange 3, the second-order pair 1), ~7 of
// pipeline (cp.async, wait, barrier, source pointers, and the never-executed `@!PT LDS` ptxas puts beside
// cp.async). W4 SB3 73: 16 HFMA2 + 16 LOP3 + 4 SHF (codes), the same stats, loads and pipeline. The issue's
// targets (<= 2.5 for 3-bit, <= 2.0 for 4-bit: 80 / 64 a record) are met for 3-bit at 1-8 rows, not at 9-16
// rows (the second n-tile adds 4 HMMA and 2 LDSM a record) and not for 4-bit (-9 a record to go: with one HFMA2
// and one LOP3 a pair the codes alone cost 1.1 a weight, the stats of 16 x 16 groups 0.6; BENCHMARKS.md).
// ===============================================================================================================

#include "spqr_matmul.h"
#include "spqr_ptx.cuh"

#if defined(SPQR_SHIM)
// The CPU shim runs the blocks of a grid one after another and a block's threads as fibers that switch only at
// barriers and collectives, so these are plain memory operations there.
namespace {
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() {}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
}  // namespace
#endif

// A named namespace: the kernels' mangled names (_ZN4spqr...) are the same under nvcc, NVRTC and g++ and do
// not depend on the compiling process (anonymous namespaces get a per-compilation tag under NVRTC).
namespace spqr {

constexpr int kRows = 16;      // rows of a row tile (beta2)
constexpr int kCols = 64;      // stored columns of a record (4 groups of beta1 = 16)
constexpr int kWarps = 4;      // warps (= row tiles) per block
constexpr int kStages = 3;     // cp.async pipeline depth
constexpr int kRecs = 2;       // records per warp and stage (consecutive k-blocks)
constexpr int kXPitch = kRecs * kCols + 8;  // halves per staged x row: 128 + 8 of padding (ldmatrix bank conflicts)
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ constexpr int record_words(int w, int sb) { return 32 * w + 4 * sb + 8; }

__device__ __forceinline__ uint32_t h2_bits(__half2 h) {
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}
__device__ __forceinline__ __half2 bits_h2(uint32_t u) {
  __half2 h;
  memcpy(&h, &u, sizeof(u));
  return h;
}

// fma.rn.f16x2: a * b + c per half, one rounding. The shim (no host __hfma2) computes it in double, where the
// product of two halves and the sum with a third are exact for the magnitudes here, then rounds once.
__device__ __forceinline__ __half2 hfma2(__half2 a, __half2 b, __half2 c) {
#if defined(SPQR_SHIM)
  const float2 fa = __half22float2(a), fb = __half22float2(b), fc = __half22float2(c);
  return __halves2half2(__double2half(static_cast<double>(fa.x) * fb.x + fc.x),
                        __double2half(static_cast<double>(fa.y) * fb.y + fc.y));
#else
  return __hfma2(a, b, c);
#endif
}

__device__ __forceinline__ float bias_at(const SpqrBias& bias, int row) {
  if (bias.f16 != nullptr) return __half2float(bias.f16[row]);
  if (bias.f32 != nullptr) return bias.f32[row];
  return 0.0f;
}

__device__ __forceinline__ float half_bits_to_float(uint32_t bits16) {
  __half h;
  const uint16_t b = static_cast<uint16_t>(bits16);
  memcpy(&h, &b, sizeof(b));
  return __half2float(h);
}

constexpr uint8_t kSelectLow = 0xE4;  // lop3: (a & c) | (b & ~c)
constexpr uint8_t kAndOr = 0xEA;      // lop3: (a & b) | c
constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024 in both halves: | code gives 1024 + code exactly

// ---- the weight exponent k ----------------------------------------------------------------------------------
// Codes enter the fp16 arithmetic as subnormal numbers: the bits (code << p) of a half with a zero exponent field
// are the value code * 2^(p - 24), exactly, with no offset to remove. One HFMA2 per pair then gives
//   w'' = fma16(code * 2^(p-24), S16 * 2^(24-p-k), C16 * 2^-k) = 2^-k * fma16(code, S16, C16)
// (S16 = fp16(scale), C16 = fp16(-scale*zero), the products exact), the weight scaled by 2^-k. k is chosen per
// warp and k-range from an upper bound of the scales it will meet (scale_bound) so that S16 * 2^(24-k) stays
// below 2^15 (fp16 max 65504); the accumulators are scaled back by 2^k (exact, fp32) before they leave the warp.
// w'' equals 2^-k times the unscaled fp16 weight except where |w''| < 2^-14 (fp16 subnormal results, |w| <
// 2^(k-14) ~ bound/32), where it is within 2^(k-24) of it.

// |scale| <= |s_scale| * max(|z_scale|, |2^SB - 1 - z_scale|) over the 4 groups of the record at `sec` (its 8
// second-order words: [s_scale z_scale s_zero z_zero] per group as fp16 halves).
template <int SB>
__device__ __forceinline__ float record_scale_bound(const uint32_t* __restrict__ sec) {
  constexpr float kMaxCode = static_cast<float>((1 << SB) - 1);
  const uint4 lo = *reinterpret_cast<const uint4*>(sec), hi = *reinterpret_cast<const uint4*>(sec + 4);
  const uint32_t w[4] = {lo.x, lo.z, hi.x, hi.z};  // (s_scale, z_scale) of groups 0..3
  float bound = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float ss = half_bits_to_float(w[j]), zs = half_bits_to_float(w[j] >> 16);
    bound = fmaxf(bound, fabsf(ss) * fmaxf(fabsf(zs), fabsf(kMaxCode - zs)));
  }
  return bound;
}

// k for scales <= bound: the smallest k with bound * 2^(24-k) < 2^15 (k = e + 9 for bound = m * 2^e, m in
// [0.5, 1)), clamped to [-3, 24] so that 2^(12-k) is an fp16 number (below: S0 <= 2^14; above: S0 = scale
// <= 65504); 0 for bound 0.
__device__ __forceinline__ int weight_exponent(float bound) {
  if (!(bound > 0.0f)) return 0;
  const int e = static_cast<int>((__float_as_uint(bound) >> 23) & 0xffu) - 126;
  return min(24, max(-3, e + 9));
}

__device__ __forceinline__ float pow2f(int e) { return __uint_as_float(static_cast<uint32_t>(127 + e) << 23); }

// Two codes of B bits at bits [S, S + B) of each half of `word` -> half2 of the subnormals code * 2^(S-24): one
// LOP3 (word & mask).
template <int B, int S>
__device__ __forceinline__ __half2 code_pair(uint32_t word) {
  static_assert(S + B <= 10, "the code must sit in the fp16 mantissa");
  constexpr uint32_t kMask = ((1u << B) - 1u) << S;
  return bits_h2(word & (kMask | (kMask << 16)));
}

// 3-bit records (tile_layout.CODE3_SLOTS): lane L's code words W0, W1 (words 2L, 2L+1) and W2 (word 64+L) hold
// five codes a half, slot (w, i) at bits 3i (i = 0..4) of each half of W_w, and the 16th pair's code spread over
// bit 15 of each half of W0, W1, W2 (bits 0, 1, 2 of the code). kSlots3[j][k] = 5w + i for tile j's a{k}, 15
// for the spread pair; in each tile the pairs of one row share p' = 3i mod 9: (row g, row g+8) = (0, 0), (0, 3),
// (3, 6), (3, 6) in tiles 0..3 (tile_layout.CODE3_ROW_EXPONENTS), so the quad
// publishes each group's S0 already scaled by 2^-p' for row g and for row g+8 (lane 4g+t, group t).
constexpr int kSlots3[4][4] = {{0, 5, 10, 3}, {8, 1, 13, 6}, {11, 2, 4, 7}, {9, 12, 14, 15}};

// Pair of slot s (5w + i, or 15) of the words W[3] (sh[w] = W[w] >> 9) as subnormals code * 2^(p'-24): one LOP3
// for slots 0..14 (slots 3 and 4 from the shifted word), five instructions for the spread pair (assembled at
// bits 6..8: bit 15 of W0 is bit 6 of sh[0], W1 >> 8 and W2 >> 7 bring theirs to bits 7 and 8).
template <int S>
__device__ __forceinline__ __half2 code3_pair(const uint32_t (&wd)[3], const uint32_t (&sh)[3]) {
  if constexpr (S == 15) {
    const uint32_t b01 = lop3<kSelectLow>(sh[0], wd[1] >> 8, 0x00400040u);  // bit 6 from W0, 7 from W1
    return bits_h2(lop3<kSelectLow>(b01, wd[2] >> 7, 0x00c000c0u) & 0x01c001c0u);  // bit 8 from W2, mask
  } else {
    constexpr int w = S / 5, i = S % 5;
    return code_pair<3, 3 * (i % 3)>(i < 3 ? wd[w] : sh[w]);
  }
}

// The A fragments of one record for this lane: a[j][k] = tile j's aK as a half2 (KERNELS_V2_SPEC.md sections 1
// and 2), the weights scaled by 2^-k (above), with the fp16 arithmetic described at the top. `rec` points at the
// record (shared or global memory, 16-byte aligned); `pow12` = 2^(12-k) in both halves; `xch` = this warp's 32 slots
// (shared memory; not touched by the warp's previous record: callers alternate two sets). Warp collective.
template <int W, int SB>
__device__ __forceinline__ void decode_record(const uint32_t* __restrict__ rec, int lane, __half2 pow12, uint2* xch,
                                              uint32_t (&a)[4][4]) {
  constexpr int kCodeWords = 32 * W;
  const int t = lane & 3;

  // ---- stats, in fp16x2 (row g, row g+8): lane 4g+t decodes group t and publishes it to its quad ----
  const uint32_t* st = rec + kCodeWords;
  const int sbit = 4 * SB * lane;
  const uint32_t sw = __funnelshift_r(st[sbit >> 5], st[(sbit >> 5) + 1], sbit & 31);  // codes 4L.. at bit 0
  // sw: scale code of row g at bit 0, row g+8 at SB, zero codes at 2*SB, 3*SB. spread: row g's in the low half,
  // row g+8's in the high half, each pair then masked into the fp16 mantissa of 1024 (one LOP3: (v & mask) |
  // 1024; exact integers after -1024).
  constexpr uint32_t kCodeMask = ((1u << SB) - 1u) * 0x10001u;
  const uint32_t spread = lop3<kSelectLow>(sw, sw << (16 - SB), 0x0000ffffu);
  const __half2 magic = bits_h2(kMagic);
  const __half2 sc = __hsub2(bits_h2(lop3<kAndOr>(spread, kCodeMask, kMagic)), magic);
  const __half2 zc = __hsub2(bits_h2(lop3<kAndOr>(spread >> (2 * SB), kCodeMask, kMagic)), magic);
  const uint2 sec = *reinterpret_cast<const uint2*>(rec + kCodeWords + 4 * SB + 2 * t);
  const __half2 s2 = bits_h2(sec.x), z2 = bits_h2(sec.y);  // (s_scale, z_scale), (s_zero, z_zero)
  const __half2 s1 = __hmul2(__low2half2(s2), pow12);  // s_scale 2^(12-k)
  const __half2 my_s12 = hfma2(sc, s1, __hmul2(s1, __hneg2(__high2half2(s2))));  // scale 2^(12-k) = S0 2^-12
  const __half2 sz = __low2half2(z2);
  const __half2 zero = hfma2(zc, sz, __hmul2(sz, __hneg2(__high2half2(z2))));
  const __half2 my_c = __hmul2(__hmul2(my_s12, __float2half2_rn(-0x1p-12f)), zero);  // -scale*zero * 2^-k
  // Publish S = S0 * 2^-p' = (S0 2^-12) * 2^(12-p') for the bit position p' of the row's pairs in tile t, one
  // HMUL2 (4-bit: row g at p' = 0, row g+8 at 4; 3-bit: CODE3_ROW_EXPONENTS[t]; 2-bit: p' depends on the column half,
  // so the tiles scale S0 by 2^-4 themselves).
  __half2 pub = __float2half2_rn(4096.0f);
  if constexpr (W == 4) pub = __floats2half2_rn(4096.0f, 256.0f);
  if constexpr (W == 3) {  // 2^(12 - p'), p' = CODE3_ROW_EXPONENTS[t]: (0, 0), (0, 3), (3, 6), (3, 6)
    pub = __floats2half2_rn(t < 2 ? 4096.0f : 512.0f, t == 0 ? 4096.0f : t == 1 ? 512.0f : 64.0f);
  }
  xch[lane] = make_uint2(h2_bits(__hmul2(my_s12, pub)), h2_bits(my_c));

  // ---- codes: v[j][k] = tile j's pair k (a{k}) as subnormals code * 2^(p-24) ----
  __half2 v[4][4];
  if constexpr (W == 4) {  // p = 4 * (k & 1): row g at bit 0, row g+8 at bit 4
    const uint4 q = *reinterpret_cast<const uint4*>(rec + 4 * lane);
    const uint32_t cw[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // word j = tile j, pair k at bits 4k: nibbles 0, 1 of each byte pair
      const uint32_t hi8 = cw[j] >> 8;
      v[j][0] = code_pair<4, 0>(cw[j]);
      v[j][1] = code_pair<4, 4>(cw[j]);
      v[j][2] = code_pair<4, 0>(hi8);
      v[j][3] = code_pair<4, 4>(hi8);
    }
  } else if constexpr (W == 2) {  // p = 4 * (k >> 1): columns 2t.. at bit 0, 2t+8.. at bit 4
    const uint2 q = *reinterpret_cast<const uint2*>(rec + 2 * lane);
    const uint32_t cw[2] = {q.x, q.y};
#pragma unroll
    for (int w = 0; w < 2; ++w) {  // word w = tiles 2w (bits 0..7 of each half), 2w+1 (bits 8..15)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // pairs k at bits 2k of byte h: k = 0, 2 at bits 0, 4; k = 1, 3 after >> 2
        const uint32_t b0 = cw[w] >> (8 * h), b2 = cw[w] >> (8 * h + 2);
        v[2 * w + h][0] = code_pair<2, 0>(b0);
        v[2 * w + h][1] = code_pair<2, 0>(b2);
        v[2 * w + h][2] = code_pair<2, 4>(b0);
        v[2 * w + h][3] = code_pair<2, 4>(b2);
      }
    }
  } else {  // p' = CODE3_ROW_EXPONENTS[j][k & 1]
    const uint2 q = *reinterpret_cast<const uint2*>(rec + 2 * lane);
    const uint32_t wd[3] = {q.x, q.y, rec[64 + lane]};
    const uint32_t sh[3] = {wd[0] >> 9, wd[1] >> 9, wd[2] >> 9};
    v[0][0] = code3_pair<kSlots3[0][0]>(wd, sh);
    v[0][1] = code3_pair<kSlots3[0][1]>(wd, sh);
    v[0][2] = code3_pair<kSlots3[0][2]>(wd, sh);
    v[0][3] = code3_pair<kSlots3[0][3]>(wd, sh);
    v[1][0] = code3_pair<kSlots3[1][0]>(wd, sh);
    v[1][1] = code3_pair<kSlots3[1][1]>(wd, sh);
    v[1][2] = code3_pair<kSlots3[1][2]>(wd, sh);
    v[1][3] = code3_pair<kSlots3[1][3]>(wd, sh);
    v[2][0] = code3_pair<kSlots3[2][0]>(wd, sh);
    v[2][1] = code3_pair<kSlots3[2][1]>(wd, sh);
    v[2][2] = code3_pair<kSlots3[2][2]>(wd, sh);
    v[2][3] = code3_pair<kSlots3[2][3]>(wd, sh);
    v[3][0] = code3_pair<kSlots3[3][0]>(wd, sh);
    v[3][1] = code3_pair<kSlots3[3][1]>(wd, sh);
    v[3][2] = code3_pair<kSlots3[3][2]>(wd, sh);
    v[3][3] = code3_pair<kSlots3[3][3]>(wd, sh);
  }

  // ---- the quad's stats: group j's (S, C) from lane 4g + j, two 16-byte loads ----
  __syncwarp();
  const uint4* quad = reinterpret_cast<const uint4*>(xch + (lane & ~3));
  const uint4 st01 = quad[0], st23 = quad[1];
  const uint32_t s0[4] = {st01.x, st01.z, st23.x, st23.z}, cc[4] = {st01.y, st01.w, st23.y, st23.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const __half2 c2 = bits_h2(cc[j]);
    // 2-bit: S0 * 2^-4 for the pairs at p = 4 (exact unless an fp16 subnormal: scales below bound * 2^-23); 3- and
    // 4-bit: published per row already
    const __half2 s_p0 = bits_h2(s0[j]);
    const __half2 sp[2] = {s_p0, W != 2 ? s_p0 : __hmul2(s_p0, __float2half2_rn(0.0625f))};
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // a{k}: row g for even k, g+8 for odd k (row broadcast of S and C)
      const __half2 s = sp[W != 2 ? 0 : (k >> 1)];
      a[j][k] = h2_bits(hfma2(v[j][k], (k & 1) ? __high2half2(s) : __low2half2(s),
                              (k & 1) ? __high2half2(c2) : __low2half2(c2)));
    }
  }
}

// ---- small batch: 1..16 activation rows ----------------------------------------------------------------------
template <int W, int SB, int NT>
__global__ void __launch_bounds__(kWarps * 32, 4)
    spqr_matmul_small_kernel(const SpqrLayer layer, const __half* __restrict__ x, const int rows, const int ldx,
                             const SpqrBias bias, __half* __restrict__ y, float* __restrict__ workspace,
                             int* __restrict__ counters) {
  constexpr int R = record_words(W, SB);
  constexpr int NB = 8 * NT;  // activation rows the fragments hold
  __shared__ __align__(16) uint32_t rec_s[kStages][kWarps][kRecs * R];
  __shared__ __align__(16) __half x_s[kStages][NB][kXPitch];
  __shared__ float out_s[kWarps][kRows][NB];  // outlier sums per warp
  __shared__ __align__(16) uint2 xch_s[kWarps][2][32];  // stats exchange, two sets (records alternate)
  __shared__ int is_last;

  const int out = layer.out_features, in = layer.in_features;
  const int row_tiles = (out + kRows - 1) / kRows;
  const int kblocks = (in + kCols - 1) / kCols;
  const int splits = gridDim.y, split = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rt = blockIdx.x * kWarps + warp;
  const bool active = rt < row_tiles;  // warp-uniform
  const int kb0 = static_cast<int>((static_cast<long long>(split) * kblocks) / splits);
  const int kb1 = static_cast<int>((static_cast<long long>(split + 1) * kblocks) / splits);
  const int items = kb1 - kb0;  // >= 1: splits <= kblocks
  const uint32_t* tiles = reinterpret_cast<const uint32_t*>(layer.tiles);
  // cp.async destinations and ldmatrix rows as 32-bit shared addresses taken once (SmemAddr, spqr_ptx.cuh), each
  // stage kRecStage / kXStage bytes further: NVRTC then computes them as nvcc does (it would use 64-bit generic
  // addresses: +16 registers, +3% instructions at 9-16 rows).
  constexpr int kRecStage = kWarps * kRecs * R * 4, kXStage = NB * kXPitch * 2;
  const SmemAddr rec_s0 = smem_addr(&rec_s[0][warp][0]);  // this warp's records of stage 0
  const SmemAddr x_s0 = smem_addr(&x_s[0][0][0]);

  // A warp past the last row tile (the last group of a layer whose RT is not a multiple of 4) streams and
  // decodes the last row tile again and discards the result: no divergent branch around the warp collectives.
  const uint32_t* rec_src = tiles + static_cast<size_t>(active ? rt : row_tiles - 1) * kblocks * R;
  const int pairs = (items + kRecs - 1) / kRecs;  // stages: records kb0 + 2p and (when < kb1) kb0 + 2p + 1
  // Stage p into slot `stage`: the warp's kRecs consecutive records are one contiguous run of memory, copied
  // by 16-byte chunks (lane c copies chunks c, c + 32, ...; only the first record when the second is past kb1);
  // threads copy the NB x 16 chunks of x (rows < `rows`).
  // Lane sources at the k-range's start; stage p reads kRecs * p records (kRecs * 64 columns of x) further. x
  // rows >= `rows` are not copied: their shared memory is never initialised and only feeds the fragment columns
  // (activation rows) that are not written out.
  const uint32_t* rec_lane = rec_src + static_cast<size_t>(kb0) * R + 4 * lane;
  constexpr int kXChunks = (NB * 16 + kWarps * 32 - 1) / (kWarps * 32);  // 16-byte x chunks per thread and stage
  const __half* x_lane[kXChunks];
  bool x_copies[kXChunks];
  SmemAddr x_dst[kXChunks];  // the chunk's destination in stage 0 of x_s
#pragma unroll
  for (int i = 0; i < kXChunks; ++i) {
    const int q = i * kWarps * 32 + threadIdx.x, xb = q >> 4, xc = q & 15;  // row xb, 16-byte chunk xc
    x_copies[i] = q < NB * 16 && xb < rows;
    x_lane[i] = x + static_cast<size_t>(x_copies[i] ? xb : 0) * ldx + kb0 * kCols + 8 * xc;
    x_dst[i] = x_s0 + 2 * (xb * kXPitch + 8 * xc);
  }
  // Copy stage p (records from `recs`, x from `xs`, both already advanced to stage p) into slot `stage`: lane c
  // copies the 16-byte chunks c, c + 32, ... of the stage's records, only the first record's when `both` is false
  // (the last stage of an odd k-range), and threads the x chunks of the rows < `rows`.
  auto copy_stage = [&](int stage, const uint32_t* recs, const __half* const (&xs)[kXChunks], bool both) {
#pragma unroll
    for (int c0 = 0; c0 < kRecs * R / 4; c0 += 32) {
      const bool full_chunk = c0 + 32 <= R / 4 || (both && c0 + 32 <= kRecs * R / 4);  // compile time when both
      if (full_chunk || c0 + lane < (both ? kRecs : 1) * (R / 4)) {
        cp_async_16_at(rec_s0 + stage * kRecStage + 16 * (c0 + lane), recs + 4 * c0);
      }
    }
#pragma unroll
    for (int i = 0; i < kXChunks; ++i) {
      const int q = i * kWarps * 32 + threadIdx.x;
      if (x_copies[i] && (both || (q & 15) < kCols / 8)) cp_async_16_at(x_dst[i] + stage * kXStage, xs[i]);
    }
  };
  auto issue = [&](int stage, int p) {  // any stage: sources from the k-range's start
    const __half* xs[kXChunks];
#pragma unroll
    for (int i = 0; i < kXChunks; ++i) xs[i] = x_lane[i] + kRecs * kCols * p;
    copy_stage(stage, rec_lane + static_cast<size_t>(kRecs) * R * p, xs, kRecs * p + 1 < items);
  };

  // Prologue: kStages - 1 stages in flight (one commit group each, possibly empty).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < pairs) issue(s, s);
    cp_async_commit();
  }

  // The weight exponent k of this warp's k-range (decode_record): lane i bounds the scales of records
  // kb0 + i, kb0 + i + 32, ...; the warp takes the maximum.
  float bound = 0.0f;
  for (int kb = kb0 + lane; kb < kb1; kb += 32) {
    bound = fmaxf(bound, record_scale_bound<SB>(rec_src + static_cast<size_t>(kb) * R + 32 * W + 4 * SB));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) bound = fmaxf(bound, __shfl_xor_sync(kFullMask, bound, o));
  const int kexp = weight_exponent(bound);
  const __half2 pow12 = __float2half2_rn(pow2f(12 - kexp));
  const float unscale = pow2f(kexp);

  // Outliers of this split while the first stages load: they seed the accumulators (in units of 2^k).
  const int g = lane >> 2, t = lane & 3;
  float acc[NT][4];
  {
    const int r = lane & 15, h = lane >> 4;
    float os[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) os[b] = 0.0f;
    if (active) {
      const int p_end = __ldg(layer.outlier_row_ptr + rt * kRows + r + 1);
      for (int p = __ldg(layer.outlier_row_ptr + rt * kRows + r) + split + splits * h; p < p_end; p += 2 * splits) {
        const uint32_t word = static_cast<uint32_t>(__ldg(layer.outliers + p));
        const float v = half_bits_to_float(word);
        const __half* xc = x + (word >> 16);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          if (b < rows) os[b] = fmaf(v, __half2float(xc[static_cast<size_t>(b) * ldx]), os[b]);
        }
      }
    }
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      os[b] += __shfl_xor_sync(kFullMask, os[b], 16);  // a + b == b + a: both halves get the same sum
      if (h == 0) out_s[warp][r][b] = os[b] * pow2f(-kexp);  // exact
    }
    __syncwarp();
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      acc[n][0] = out_s[warp][g][8 * n + 2 * t];
      acc[n][1] = out_s[warp][g][8 * n + 2 * t + 1];
      acc[n][2] = out_s[warp][g + 8][8 * n + 2 * t];
      acc[n][3] = out_s[warp][g + 8][8 * n + 2 * t + 1];
    }
  }

  // Main loop: wait for stage p, refill the slot freed by stage p-1, decode + mma the stage's records. The steady
  // state runs whole rounds of kStages stages of kRecs records unrolled, so every shared-memory address is a
  // constant offset and no record needs a bounds test; the remaining stages (the last one possibly holding one
  // record) run in a rolled tail loop.
  const int m = lane >> 3;  // ldmatrix: lane gives row (lane & 7) of matrix m = (tile + m/2, k half m%2)
  const SmemAddr x_row = x_s0 + 2 * ((lane & 7) * kXPitch + 16 * (m >> 1) + 8 * (m & 1));  // stage 0, n 0, r 0
  auto record = [&](int stage, int r) {
    uint32_t a[4][4];
    decode_record<W, SB>(&rec_s[stage][warp][r * R], lane, pow12, xch_s[warp][r], a);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int jp = 0; jp < 2; ++jp) {
        uint32_t bq[4];
        ldmatrix_x4_at(bq, x_row + stage * kXStage + 2 * (8 * n * kXPitch + kCols * r + 32 * jp));
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const uint32_t bf[2] = {bq[2 * jj], bq[2 * jj + 1]};
          mma_m16n8k16_f16f32(acc[n], a[2 * jp + jj], bf, acc[n]);
        }
      }
    }
  };
  auto begin_stage = [&](int stage, int p) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (p + kStages - 1 < pairs) issue((stage + kStages - 1) % kStages, p + kStages - 1);
    cp_async_commit();
  };
  // Steady state: whole rounds of kStages stages whose refills are all full stages (two records), unrolled: every
  // shared-memory address and every source offset is a constant, the sources advance once per round, and no
  // copy or record needs a test. Then the remaining stages in a rolled loop.
  const int full = items / kRecs;  // stages holding kRecs records
  int p0 = 0;
  {
    const uint32_t* recs = rec_lane;
    const __half* xs[kXChunks];
#pragma unroll
    for (int i = 0; i < kXChunks; ++i) xs[i] = x_lane[i];
    for (; p0 + 2 * kStages - 1 <= full; p0 += kStages) {  // refills p0 + kStages - 1 .. p0 + 2 kStages - 2 < full
#pragma unroll
      for (int stage = 0; stage < kStages; ++stage) {
        cp_async_wait<kStages - 2>();
        __syncthreads();
        const __half* xr[kXChunks];
#pragma unroll
        for (int i = 0; i < kXChunks; ++i) xr[i] = xs[i] + kRecs * kCols * (stage + kStages - 1);
        copy_stage((stage + kStages - 1) % kStages, recs + kRecs * R * (stage + kStages - 1), xr, true);
        cp_async_commit();
#pragma unroll
        for (int r = 0; r < kRecs; ++r) record(stage, r);
      }
      recs += kStages * kRecs * R;
#pragma unroll
      for (int i = 0; i < kXChunks; ++i) xs[i] += kStages * kRecs * kCols;
    }
  }
#pragma unroll 1
  for (int p = p0; p < pairs; ++p) {  // p0 is a multiple of kStages: slot p % kStages
    const int slot = p % kStages;
    begin_stage(slot, p);
    record(slot, 0);
    if (kRecs * p + 1 < items) record(slot, 1);  // block-uniform
  }
  cp_async_wait<0>();

  // Fragment element e of n-tile n: row g + 8*(e >> 1), activation row 8n + 2t + (e & 1).
  if (splits == 1) {
    if (active) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = rt * kRows + g + 8 * (e >> 1), b = 8 * n + 2 * t + (e & 1);
          if (row < out && b < rows) {
            y[static_cast<size_t>(b) * out + row] = __float2half_rn(acc[n][e] * unscale + bias_at(bias, row));
          }
        }
      }
    }
    return;
  }

  // Split-K: partials to the workspace, the last block of this row-tile group reduces them in split order.
  auto ws_at = [&](int s, int n, int e) {
    return workspace + ((static_cast<size_t>(blockIdx.x) * splits + s) * kWarps + warp) * (32 * 4 * NT) +
           (n * 4 + e) * 32 + lane;  // coalesced: consecutive lanes, consecutive floats
  };
  if (active) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) *ws_at(split, n, e) = acc[n][e] * unscale;  // exact
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned ticket = atomicAdd(reinterpret_cast<unsigned*>(counters + blockIdx.x), 1u);
    is_last = ticket == static_cast<unsigned>(splits - 1);
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (active) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = 0.0f;
        for (int s = 0; s < splits; ++s) v += __ldcg(ws_at(s, n, e));
        const int row = rt * kRows + g + 8 * (e >> 1), b = 8 * n + 2 * t + (e & 1);
        if (row < out && b < rows) y[static_cast<size_t>(b) * out + row] = __float2half_rn(v + bias_at(bias, row));
      }
    }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch
}

// ---- dequantization (prefill): one warp per record --------------------------------------------------------------
// Grid (KB, ceil(RT/4)), 4 warps a block (row tiles 4*blockIdx.y + w). The lane writes its 32 fp16 weights as
// half2 (16 rows x 64 columns of W per warp), then lanes 0..15 add the outliers of their row inside the record's
// 64 columns (binary search in the row's sorted run) in fp32, rounding once more to fp16.
template <int W, int SB>
__global__ void __launch_bounds__(kWarps * 32) spqr_dequantize_kernel(const SpqrLayer layer, __half* __restrict__ w) {
  constexpr int R = record_words(W, SB);
  const int out = layer.out_features, in = layer.in_features;
  const int row_tiles = (out + kRows - 1) / kRows;
  const int kblocks = (in + kCols - 1) / kCols;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rt = blockIdx.y * kWarps + warp, kb = blockIdx.x;
  if (rt >= row_tiles) return;  // warp-uniform
  const uint32_t* rec = reinterpret_cast<const uint32_t*>(layer.tiles) + (static_cast<size_t>(rt) * kblocks + kb) * R;
  __shared__ __align__(16) uint2 xch_s[kWarps][32];
  const int kexp = weight_exponent(record_scale_bound<SB>(rec + 32 * W + 4 * SB));
  uint32_t a[4][4];
  decode_record<W, SB>(rec, lane, __float2half2_rn(pow2f(12 - kexp)), xch_s[warp], a);
  const float unscale = pow2f(kexp);
  const int g = lane >> 2, t = lane & 3;
  const bool pairs_aligned = (in & 1) == 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int row = rt * kRows + g + 8 * (k & 1);
      const int col = kb * kCols + 16 * j + 2 * t + 8 * (k >> 1);
      if (row >= out || col >= in) continue;
      __half* dst = w + static_cast<size_t>(row) * in + col;
      const float2 f = __half22float2(bits_h2(a[j][k]));
      const __half2 v = __floats2half2_rn(f.x * unscale, f.y * unscale);  // exact: a power of two
      if (pairs_aligned) {
        *reinterpret_cast<__half2*>(dst) = v;  // col even, in even: 4-byte aligned, col + 1 < in
      } else {
        dst[0] = __low2half(v);
        if (col + 1 < in) dst[1] = __high2half(v);
      }
    }
  }
  __syncwarp();
  if (lane < kRows) {
    const int row = rt * kRows + lane;
    if (row < out) {
      int lo = __ldg(layer.outlier_row_ptr + row), hi = __ldg(layer.outlier_row_ptr + row + 1);
      const int p_end = hi;
      const uint32_t c0 = static_cast<uint32_t>(kb * kCols);
      while (lo < hi) {  // first entry with column >= c0
        const int mid = (lo + hi) >> 1;
        if ((static_cast<uint32_t>(__ldg(layer.outliers + mid)) >> 16) < c0) lo = mid + 1;
        else hi = mid;
      }
      for (int p = lo; p < p_end; ++p) {
        const uint32_t word = static_cast<uint32_t>(__ldg(layer.outliers + p));
        const uint32_t col = word >> 16;
        if (col >= c0 + kCols) break;
        __half* dst = w + static_cast<size_t>(row) * in + col;
        *dst = __float2half_rn(__half2float(*dst) + half_bits_to_float(word));
      }
    }
  }
}

}  // namespace spqr
