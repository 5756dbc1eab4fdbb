// SpQR matmul kernels: batch-1 matvec, small-batch (2..16 rows) matmul and dequantization for prefill.
// Pure CUDA C++ (no torch), portable to sm_80+. Launchers are declared in spqr_matmul.h; the reference they
// must match is spqr_run/quant/spqr_matmul.py (`spqr_matmul_reference`), the layout docs/FORMAT.md.
//
// Packed layout, one row tile (16 output rows) = one contiguous run of memory:
//
//   codes:  | tile(rt,0) | tile(rt,1) | ... | tile(rt,CT-1) |      tile = 256 codes, 8*W words
//            \__ 16 rows x 16 stored columns, row-major, W bits a code, little-endian bit stream __/
//            \__ half 0: rows 0..7 (4*W words) __|__ half 1: rows 8..15 (4*W words) __/
//   stats:  SB words a tile: 16 scale codes (rows 0..15) then 16 zero codes, SB bits each
//   second: 4 fp16 a tile: s_scale, z_scale, s_zero, z_zero
//
// Reconstruction (fp32, grid.dequantize_codes):
//   scale_r = s_scale * (scale_code_r - z_scale),  zero_r = s_zero * (zero_code_r - z_zero)
//   w[r, j] = scale_r * (code[r, j] - zero_r)   (+ outlier delta)
//
// Determinism: no atomics. Every sum runs in a fixed order (per-lane loops, xor-butterfly shuffles, then a
// fixed-order sum over warps in shared memory), so repeated runs are bit-identical.

#include "spqr_matmul.h"

#include <cstring>

namespace {

constexpr int kTile = 16;  // beta1 = beta2 = 16
constexpr unsigned kFullMask = 0xffffffffu;

// ---- bit helpers ----------------------------------------------------------------------------------------

// An integer v < 2^23 as a float, without I2F: or-ing v into the mantissa of 2^23 gives exactly 2^23 + v, and
// subtracting 2^23 is exact. One LOP3 (fused with the mask) and one FADD.
__device__ __forceinline__ float code_to_float(uint32_t v) {
  return __uint_as_float(0x4B000000u | v) - 8388608.0f;
}

// BITS bits starting at bit `bit` of the little-endian stream w[0] | w[1] << 32 | ...
// Called with compile-time `bit` inside fully unrolled loops, so w[] stays in registers (no local memory).
template <int BITS, int N>
__device__ __forceinline__ uint32_t bits_at(const uint32_t (&w)[N], int bit) {
  const int i = bit >> 5;
  const int s = bit & 31;
  const uint32_t v = (s + BITS <= 32 || i + 1 >= N) ? (w[i] >> s) : __funnelshift_r(w[i], w[i + 1], s);
  return v & ((1u << BITS) - 1u);
}

// The 32-bit window of the stat stream st[] that starts at code FIRST + part * STRIDE, for a runtime
// part < PARTS (which rows of the tile this lane owns). Selecting between compile-time windows keeps st[] in
// registers; a runtime register index would spill it to local memory.
template <int SB, int FIRST, int STRIDE, int PARTS>
__device__ __forceinline__ uint32_t stat_window(const uint32_t (&st)[SB + 1], int part) {
  uint32_t out = 0;
#pragma unroll
  for (int p = 0; p < PARTS; ++p) {
    const int bit = (FIRST + p * STRIDE) * SB;
    const int i = bit >> 5;
    const int s = bit & 31;
    const uint32_t window = s == 0 ? st[i] : __funnelshift_r(st[i], st[i + 1], s);
    out = p == part ? window : out;
  }
  return out;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t bits) {
  __half2 h;
  static_assert(sizeof(h) == sizeof(bits), "half2 is 32 bits");
  memcpy(&h, &bits, sizeof(bits));
  return __half22float2(h);
}

__device__ __forceinline__ float bias_at(const SpqrBias& bias, int row) {
  if (bias.f16 != nullptr) return __half2float(bias.f16[row]);
  if (bias.f32 != nullptr) return bias.f32[row];
  return 0.0f;
}

// x value of stored column c (x[perm[c]]), straight from global memory.
__device__ __forceinline__ float x_at(const __half* __restrict__ x, const uint16_t* __restrict__ perm, int c) {
  return __half2float(__ldg(x + (perm != nullptr ? __ldg(perm + c) : c)));
}

// ---- batch-1 matvec -------------------------------------------------------------------------------------
//
// Grid: one block per row tile (16 outputs). Block: kMatvecWarps warps. Thread/tile mapping:
//
//   lane  = 2 * t + h       t = 0..15: the warp's t-th tile of 16 consecutive column tiles
//                           h = 0/1  : rows 8h .. 8h+7 of that tile (a "half tile": 128 codes = W x 16 bytes)
//   warp w, step k          column tiles [16 * (w + kMatvecWarps * k), +16)
//
// so a warp streams 16 whole, consecutive tiles (16 * 32 * W bytes of contiguous codes) per step with W
// 16-byte loads a lane, and each lane keeps 8 row accumulators. x, gathered by perm and converted to fp32,
// sits in shared memory kMatvecSegTiles tiles at a time. Per (row, tile) the lane computes
//   dot = sum_j code_j * x_j,  y_r += scale_r * (dot - zero_r * sum_j x_j)
// which is scale * (code - zero) * x regrouped: 2 integer ops + 2 flops a weight, the rest per 16.
// At the end lanes of equal h are reduced by an xor butterfly, warps by a fixed-order sum in shared memory.

constexpr int kMatvecWarps = 8;
constexpr int kMatvecSegTiles = 512;  // 8192 columns of fp32 x = 32 KiB of shared memory

template <int W, int SB>
struct HalfTile {
  uint32_t w[4 * W];   // 128 codes: rows 8h..8h+7 of the tile
  uint32_t st[SB + 1];  // the tile's 32 stat codes (+ a zero word for funnel shifts)
  uint2 second;         // s_scale, z_scale | s_zero, z_zero

  // Tile `tile` (index relative to the row tile's first tile) for half h.
  __device__ __forceinline__ void load(const uint4* __restrict__ codes, const uint32_t* __restrict__ stats,
                                       const uint2* __restrict__ seconds, int tile, int h) {
    const uint4* c = codes + static_cast<size_t>(tile) * (2 * W) + h * W;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const uint4 v = __ldg(c + k);
      w[4 * k + 0] = v.x;
      w[4 * k + 1] = v.y;
      w[4 * k + 2] = v.z;
      w[4 * k + 3] = v.w;
    }
    const uint32_t* s = stats + static_cast<size_t>(tile) * SB;
#pragma unroll
    for (int k = 0; k < SB; ++k) st[k] = __ldg(s + k);
    st[SB] = 0;
    second = __ldg(seconds + tile);
  }

  // acc[i] += row (8h + i) of this tile dotted with xt[0..15] (the tile's 16 permuted x values).
  __device__ __forceinline__ void accumulate(const float* __restrict__ xt, int h, float (&acc)[8]) const {
    float xv[16];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float4 v = reinterpret_cast<const float4*>(xt)[k];
      xv[4 * k + 0] = v.x;
      xv[4 * k + 1] = v.y;
      xv[4 * k + 2] = v.z;
      xv[4 * k + 3] = v.w;
    }
    float sum_x = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) sum_x += xv[j];
    const float2 sec_scale = half2_bits_to_float2(second.x);  // (s_scale, z_scale)
    const float2 sec_zero = half2_bits_to_float2(second.y);   // (s_zero, z_zero)
    const uint32_t scale_codes = stat_window<SB, 0, 8, 2>(st, h);  // 8 codes, SB bits each
    const uint32_t zero_codes = stat_window<SB, 16, 8, 2>(st, h);
    constexpr uint32_t kStatMask = (1u << SB) - 1u;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float dot = 0.0f;
#pragma unroll
      for (int j = 0; j < 16; ++j) dot = fmaf(code_to_float(bits_at<W>(w, (16 * i + j) * W)), xv[j], dot);
      const float scale = sec_scale.x * (code_to_float((scale_codes >> (i * SB)) & kStatMask) - sec_scale.y);
      const float zero = sec_zero.x * (code_to_float((zero_codes >> (i * SB)) & kStatMask) - sec_zero.y);
      acc[i] = fmaf(scale, fmaf(-zero, sum_x, dot), acc[i]);
    }
  }
};

// xs[j] = x[perm[col0 + j]] as fp32 for j < ncols; 0 past in_features (padded columns hold code 0 but a
// nonzero dequantized value, which must meet x = 0).
__device__ __forceinline__ void gather_x_f32(float* xs, const __half* __restrict__ x,
                                             const uint16_t* __restrict__ perm, int in_features, int col0,
                                             int ncols) {
  for (int j = threadIdx.x; j < ncols; j += blockDim.x) {
    const int c = col0 + j;
    xs[j] = c < in_features ? x_at(x, perm, c) : 0.0f;
  }
}

template <int W, int SB>
__global__ void __launch_bounds__(kMatvecWarps * 32)
    spqr_matvec_kernel(const SpqrLayer layer, const __half* __restrict__ x, const SpqrBias bias,
                       __half* __restrict__ y) {
  __shared__ __align__(16) float xs[kMatvecSegTiles * kTile];  // permuted x, one segment
  __shared__ float partial[kMatvecWarps][kTile];                // per-warp row sums
  __shared__ float outlier_sum[kTile];

  const int rt = blockIdx.x;
  const int col_tiles = (layer.in_features + kTile - 1) / kTile;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int h = lane & 1;
  const int lane_tile = lane >> 1;
  const size_t first_tile = static_cast<size_t>(rt) * col_tiles;
  const uint4* codes = reinterpret_cast<const uint4*>(layer.codes) + first_tile * (2 * W);
  const uint32_t* stats = reinterpret_cast<const uint32_t*>(layer.stats) + first_tile * SB;
  const uint2* seconds = reinterpret_cast<const uint2*>(layer.second) + first_tile;

  float acc[8] = {};
  for (int seg0 = 0; seg0 < col_tiles; seg0 += kMatvecSegTiles) {
    const int seg_tiles = min(kMatvecSegTiles, col_tiles - seg0);
    __syncthreads();  // the previous segment of xs is consumed
    gather_x_f32(xs, x, layer.perm, layer.in_features, seg0 * kTile, seg_tiles * kTile);
    __syncthreads();
    // Two tiles in flight per lane: both loads are issued before either is decoded.
    constexpr int kStep = kMatvecWarps * 16;
    for (int t = warp * 16 + lane_tile; t < seg_tiles; t += 2 * kStep) {
      HalfTile<W, SB> a, b;
      a.load(codes, stats, seconds, seg0 + t, h);
      const bool has_b = t + kStep < seg_tiles;
      if (has_b) b.load(codes, stats, seconds, seg0 + t + kStep, h);
      a.accumulate(xs + t * kTile, h, acc);
      if (has_b) b.accumulate(xs + (t + kStep) * kTile, h, acc);
    }
  }

  // Lanes of equal h hold partial sums of the same 8 rows: butterfly over the tile index bits.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int offset = 2; offset < 32; offset <<= 1) acc[i] += __shfl_xor_sync(kFullMask, acc[i], offset);
  }
  if (lane < 2) {
#pragma unroll
    for (int i = 0; i < 8; ++i) partial[warp][8 * lane + i] = acc[i];
  }

  // Outliers: warp w sums rows w, w + kMatvecWarps, ... of the tile; lanes stride over the row's entries.
  const bool x_in_smem = col_tiles <= kMatvecSegTiles;  // xs still holds all of x[perm]
  for (int r = warp; r < kTile; r += kMatvecWarps) {
    const int row = rt * kTile + r;
    float s = 0.0f;
    if (row < layer.out_features) {
      const int p1 = __ldg(layer.outlier_row_ptr + row + 1);
      for (int p = __ldg(layer.outlier_row_ptr + row) + lane; p < p1; p += 32) {
        const int c = __ldg(layer.outlier_cols + p);
        const float xv = x_in_smem ? xs[c] : x_at(x, layer.perm, c);
        s = fmaf(__half2float(__ldg(layer.outlier_values + p)), xv, s);
      }
    }
    s = warp_sum(s);
    if (lane == 0) outlier_sum[r] = s;
  }
  __syncthreads();

  if (threadIdx.x < kTile) {
    const int r = threadIdx.x;
    const int row = rt * kTile + r;
    if (row < layer.out_features) {
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kMatvecWarps; ++w) v += partial[w][r];
      v += outlier_sum[r];
      v += bias_at(bias, row);
      y[row] = __float2half_rn(v);
    }
  }
}

// ---- small batch (2..16 rows) ---------------------------------------------------------------------------
//
// Same grid (one block per row tile), but each weight is decoded once and used for every activation row, so
// a lane holds decoded weights instead of codes. Thread/tile mapping:
//
//   lane = 4 * t + q        t = 0..7: the warp's t-th tile of 8 consecutive column tiles
//                           q = 0..3: rows 4q .. 4q+3 of that tile (64 codes = W x 8-byte loads)
//
// A lane decodes its 4 x 16 weights exactly as the reference does (fp32, scale * (code - zero)) and adds
// w * x[b] into acc[b][4] for each activation row b. x (BT rows, fp16) sits in shared memory a segment at a
// time. BT is the compiled row capacity (4 or 16); rows beyond the runtime count are skipped.

constexpr int kSmallWarps = 8;

template <int BT>
struct SmallBatchShape {
  static constexpr int kSegTiles = BT <= 4 ? 256 : 64;  // BT * kSegTiles * 16 fp16 = 32 KiB of x
};

template <int W, int SB, int BT>
__global__ void __launch_bounds__(kSmallWarps * 32)
    spqr_matmul_small_kernel(const SpqrLayer layer, const __half* __restrict__ x, const int rows,
                             const SpqrBias bias, __half* __restrict__ y) {
  constexpr int kSegTiles = SmallBatchShape<BT>::kSegTiles;
  constexpr int kSegCols = kSegTiles * kTile;
  __shared__ __align__(16) __half xs[BT][kSegCols];  // (rows, segment columns) of x[:, perm]
  __shared__ float partial[kSmallWarps][BT][kTile];  // per-warp sums
  __shared__ float outlier_sum[BT][kTile];

  const int rt = blockIdx.x;
  const int in = layer.in_features;
  const int col_tiles = (in + kTile - 1) / kTile;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int q = lane & 3;
  const int lane_tile = lane >> 2;
  const size_t first_tile = static_cast<size_t>(rt) * col_tiles;
  // A quarter tile is 2*W words: W 8-byte loads at uint2 offset q * W of the tile's 4 * W uint2.
  const uint2* codes = reinterpret_cast<const uint2*>(layer.codes) + first_tile * (4 * W) + q * W;
  const uint32_t* stats = reinterpret_cast<const uint32_t*>(layer.stats) + first_tile * SB;
  const uint2* seconds = reinterpret_cast<const uint2*>(layer.second) + first_tile;

  float acc[BT][4] = {};
  for (int seg0 = 0; seg0 < col_tiles; seg0 += kSegTiles) {
    const int seg_tiles = min(kSegTiles, col_tiles - seg0);
    const int ncols = seg_tiles * kTile;
    __syncthreads();
    for (int idx = threadIdx.x; idx < rows * ncols; idx += blockDim.x) {
      const int b = idx / ncols;
      const int j = idx - b * ncols;
      const int c = seg0 * kTile + j;
      xs[b][j] = c < in ? __ldg(x + static_cast<size_t>(b) * in + (layer.perm ? __ldg(layer.perm + c) : c))
                        : __float2half_rn(0.0f);
    }
    __syncthreads();

    for (int t = warp * 8 + lane_tile; t < seg_tiles; t += kSmallWarps * 8) {
      const int tile = seg0 + t;
      uint32_t wd[2 * W];
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const uint2 v = __ldg(codes + static_cast<size_t>(tile) * (4 * W) + k);
        wd[2 * k] = v.x;
        wd[2 * k + 1] = v.y;
      }
      uint32_t st[SB + 1];
#pragma unroll
      for (int k = 0; k < SB; ++k) st[k] = __ldg(stats + static_cast<size_t>(tile) * SB + k);
      st[SB] = 0;
      const uint2 sec = __ldg(seconds + tile);
      const float2 sec_scale = half2_bits_to_float2(sec.x);
      const float2 sec_zero = half2_bits_to_float2(sec.y);
      const uint32_t scale_codes = stat_window<SB, 0, 4, 4>(st, q);
      const uint32_t zero_codes = stat_window<SB, 16, 4, 4>(st, q);
      constexpr uint32_t kStatMask = (1u << SB) - 1u;

      // Decode the 4 x 16 weights with the reference's exact fp32 operations (no contraction into FMAs).
      float wv[4][16];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float scale =
            __fmul_rn(sec_scale.x, __fsub_rn(code_to_float((scale_codes >> (i * SB)) & kStatMask), sec_scale.y));
        const float zero =
            __fmul_rn(sec_zero.x, __fsub_rn(code_to_float((zero_codes >> (i * SB)) & kStatMask), sec_zero.y));
#pragma unroll
        for (int j = 0; j < 16; ++j)
          wv[i][j] = __fmul_rn(scale, __fsub_rn(code_to_float(bits_at<W>(wd, (16 * i + j) * W)), zero));
      }

#pragma unroll
      for (int b = 0; b < BT; ++b) {
        if (b < rows) {
          float xv[16];
          const uint4* xp = reinterpret_cast<const uint4*>(&xs[b][t * kTile]);
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            const uint4 v = xp[k];
            const uint32_t parts[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int p = 0; p < 4; ++p) {
              const float2 f = half2_bits_to_float2(parts[p]);
              xv[8 * k + 2 * p] = f.x;
              xv[8 * k + 2 * p + 1] = f.y;
            }
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 16; ++j) acc[b][i] = fmaf(wv[i][j], xv[j], acc[b][i]);
          }
        }
      }
    }
  }

  // Lanes of equal q hold the same 4 rows: butterfly over the tile index bits (lane bits 2..4).
#pragma unroll
  for (int b = 0; b < BT; ++b) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int offset = 4; offset < 32; offset <<= 1) acc[b][i] += __shfl_xor_sync(kFullMask, acc[b][i], offset);
    }
  }
  if (lane < 4) {
#pragma unroll
    for (int b = 0; b < BT; ++b) {
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][b][4 * lane + i] = acc[b][i];
    }
  }

  // Outliers: warp per row, lanes stride over its entries, one sum per activation row.
  const bool x_in_smem = col_tiles <= kSegTiles;
  for (int r = warp; r < kTile; r += kSmallWarps) {
    const int row = rt * kTile + r;
    float s[BT] = {};
    if (row < layer.out_features) {
      const int p1 = __ldg(layer.outlier_row_ptr + row + 1);
      for (int p = __ldg(layer.outlier_row_ptr + row) + lane; p < p1; p += 32) {
        const int c = __ldg(layer.outlier_cols + p);
        const float v = __half2float(__ldg(layer.outlier_values + p));
        const int src = x_in_smem ? c : (layer.perm != nullptr ? __ldg(layer.perm + c) : c);
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          if (b < rows) {
            const float xv = x_in_smem ? __half2float(xs[b][src])
                                       : __half2float(__ldg(x + static_cast<size_t>(b) * in + src));
            s[b] = fmaf(v, xv, s[b]);
          }
        }
      }
    }
#pragma unroll
    for (int b = 0; b < BT; ++b) {
      const float total = warp_sum(s[b]);
      if (lane == 0) outlier_sum[b][r] = total;
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < rows * kTile; idx += blockDim.x) {
    const int b = idx / kTile;
    const int r = idx - b * kTile;
    const int row = rt * kTile + r;
    if (row < layer.out_features) {
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kSmallWarps; ++w) v += partial[w][b][r];
      v += outlier_sum[b][r];
      v += bias_at(bias, row);
      y[static_cast<size_t>(b) * layer.out_features + row] = __float2half_rn(v);
    }
  }
}

// ---- dequantization (prefill) ---------------------------------------------------------------------------
//
// Grid (ceil(CT / 32), RT); block (32, 16): thread (tx, ty) writes row ty of column tile 32 * blockIdx.x + tx,
// i.e. 16 consecutive fp16 (32 bytes) of W in stored column order, so a warp writes 1 KiB of one row
// contiguously. Values are the reference's exactly: fp32 scale * (code - zero), + the outlier delta in fp32,
// one rounding to fp16. The caller gathers x by perm and calls cuBLAS.

constexpr int kDequantTilesX = 32;

template <int W, int SB>
__global__ void __launch_bounds__(kDequantTilesX * kTile)
    spqr_dequantize_kernel(const SpqrLayer layer, __half* __restrict__ out) {
  const int in = layer.in_features;
  const int col_tiles = (in + kTile - 1) / kTile;
  const int ct = blockIdx.x * kDequantTilesX + threadIdx.x;
  const int r = threadIdx.y;
  const int row = blockIdx.y * kTile + r;
  if (ct >= col_tiles || row >= layer.out_features) return;

  const size_t tile = static_cast<size_t>(blockIdx.y) * col_tiles + ct;
  // Row r's 16 codes are bits [16 r W, 16 (r + 1) W) of the tile: at most 64 bits starting at bit 0 or 16 of a
  // word, so two words and a 64-bit shift cover them.
  const uint32_t* words = reinterpret_cast<const uint32_t*>(layer.codes) + tile * (8 * W);
  const int bit0 = 16 * r * W;
  const int word0 = bit0 >> 5;
  const uint32_t lo = __ldg(words + word0);
  const uint32_t hi = word0 + 1 < 8 * W ? __ldg(words + word0 + 1) : 0u;
  const unsigned long long row_bits = ((static_cast<unsigned long long>(hi) << 32) | lo) >> (bit0 & 31);

  // Scale code r at bit r * SB and zero code 16 + r at bit (16 + r) * SB of the tile's SB stat words.
  const uint32_t* st = reinterpret_cast<const uint32_t*>(layer.stats) + tile * SB;
  auto stat_code = [&](int bit) {
    const int i = bit >> 5;
    const uint32_t a = __ldg(st + i);
    const uint32_t b = i + 1 < SB ? __ldg(st + i + 1) : 0u;
    return __funnelshift_r(a, b, bit & 31) & ((1u << SB) - 1u);
  };
  const uint2 sec = __ldg(reinterpret_cast<const uint2*>(layer.second) + tile);
  const float2 sec_scale = half2_bits_to_float2(sec.x);
  const float2 sec_zero = half2_bits_to_float2(sec.y);
  const float scale = __fmul_rn(sec_scale.x, __fsub_rn(code_to_float(stat_code(r * SB)), sec_scale.y));
  const float zero = __fmul_rn(sec_zero.x, __fsub_rn(code_to_float(stat_code((16 + r) * SB)), sec_zero.y));

  float wv[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const uint32_t code = static_cast<uint32_t>(row_bits >> (j * W)) & ((1u << W) - 1u);
    wv[j] = __fmul_rn(scale, __fsub_rn(code_to_float(code), zero));
  }

  // Outliers of this row inside columns [c0, c0 + 16): binary search in the row's sorted columns.
  const int c0 = ct * kTile;
  int lo_p = __ldg(layer.outlier_row_ptr + row);
  int hi_p = __ldg(layer.outlier_row_ptr + row + 1);
  const int p_end = hi_p;
  while (lo_p < hi_p) {
    const int mid = (lo_p + hi_p) >> 1;
    if (static_cast<int>(__ldg(layer.outlier_cols + mid)) < c0) lo_p = mid + 1;
    else hi_p = mid;
  }
  for (int p = lo_p; p < p_end; ++p) {
    const int dc = static_cast<int>(__ldg(layer.outlier_cols + p)) - c0;
    if (dc >= kTile) break;
    const float delta = __half2float(__ldg(layer.outlier_values + p));
#pragma unroll
    for (int j = 0; j < 16; ++j) wv[j] = dc == j ? __fadd_rn(wv[j], delta) : wv[j];
  }

  __half* dst = out + static_cast<size_t>(row) * in + c0;
  const int ncols = min(kTile, in - c0);
  if (ncols == kTile && (in & 7) == 0) {  // 16-byte aligned: two vector stores
    uint32_t packed[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const __half2 hv = __floats2half2_rn(wv[2 * k], wv[2 * k + 1]);
      memcpy(&packed[k], &hv, sizeof(hv));
    }
    reinterpret_cast<uint4*>(dst)[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    reinterpret_cast<uint4*>(dst)[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      if (j < ncols) dst[j] = __float2half_rn(wv[j]);
    }
  }
}

// ---- dispatch on (wbits, stat_bits) ---------------------------------------------------------------------

template <int W, int SB>
struct MatvecLaunch {
  static void run(const SpqrLayer& layer, const __half* x, SpqrBias bias, __half* y, cudaStream_t stream) {
    const int row_tiles = (layer.out_features + kTile - 1) / kTile;
    SPQR_LAUNCH(row_tiles, kMatvecWarps * 32, 0, stream, spqr_matvec_kernel<W, SB>)(layer, x, bias, y);
  }
};

template <int W, int SB>
struct SmallBatchLaunch {
  static void run(const SpqrLayer& layer, const __half* x, int rows, SpqrBias bias, __half* y,
                  cudaStream_t stream) {
    const int row_tiles = (layer.out_features + kTile - 1) / kTile;
    if (rows <= 4) {
      SPQR_LAUNCH(row_tiles, kSmallWarps * 32, 0, stream, spqr_matmul_small_kernel<W, SB, 4>)
      (layer, x, rows, bias, y);
    } else {
      SPQR_LAUNCH(row_tiles, kSmallWarps * 32, 0, stream, spqr_matmul_small_kernel<W, SB, 16>)
      (layer, x, rows, bias, y);
    }
  }
};

template <int W, int SB>
struct DequantizeLaunch {
  static void run(const SpqrLayer& layer, __half* w, cudaStream_t stream) {
    const int row_tiles = (layer.out_features + kTile - 1) / kTile;
    const int col_tiles = (layer.in_features + kTile - 1) / kTile;
    const dim3 grid((col_tiles + kDequantTilesX - 1) / kDequantTilesX, row_tiles);
    const dim3 block(kDequantTilesX, kTile);
    SPQR_LAUNCH(grid, block, 0, stream, spqr_dequantize_kernel<W, SB>)(layer, w);
  }
};

// Launch<W, SB>::run(args...) for the runtime pair; false when that pair is not compiled.
template <template <int, int> class Launch, typename... Args>
bool dispatch_bits(int wbits, int stat_bits, Args&&... args) {
#define SPQR_CASE(W, SB)                \
  if (wbits == W && stat_bits == SB) {  \
    Launch<W, SB>::run(args...);        \
    return true;                        \
  }
  SPQR_CASE(2, 2) SPQR_CASE(2, 3) SPQR_CASE(2, 4)
  SPQR_CASE(3, 2) SPQR_CASE(3, 3) SPQR_CASE(3, 4)
  SPQR_CASE(4, 2) SPQR_CASE(4, 3) SPQR_CASE(4, 4)
#undef SPQR_CASE
  return false;
}

}  // namespace

bool spqr_kernels_support(int wbits, int stat_bits) {
  return wbits >= 2 && wbits <= 4 && stat_bits >= 2 && stat_bits <= 4;
}

cudaError_t spqr_matvec(const SpqrLayer& layer, const __half* x, SpqrBias bias, __half* y, cudaStream_t stream) {
  if (!dispatch_bits<MatvecLaunch>(layer.wbits, layer.stat_bits, layer, x, bias, y, stream)) {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t spqr_matmul_small(const SpqrLayer& layer, const __half* x, int rows, SpqrBias bias, __half* y,
                              cudaStream_t stream) {
  if (rows < 1 || rows > 16) return cudaErrorInvalidValue;
  if (!dispatch_bits<SmallBatchLaunch>(layer.wbits, layer.stat_bits, layer, x, rows, bias, y, stream)) {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t spqr_dequantize(const SpqrLayer& layer, __half* w, cudaStream_t stream) {
  if ((layer.out_features + kTile - 1) / kTile > 65535) return cudaErrorInvalidValue;  // gridDim.y limit
  if (!dispatch_bits<DequantizeLaunch>(layer.wbits, layer.stat_bits, layer, w, stream)) {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
