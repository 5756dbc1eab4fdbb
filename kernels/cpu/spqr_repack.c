/* spqr_repack.c: `.spqr` format-3 records (GPU tensor-core fragment order) -> the CPU layout, and the int8
 * (Q8) form of dense matrices (embedding, LM head).
 *
 * Record bit positions are those of spqr_run/quant/tile_layout.py (docs/FORMAT.md, "SpQR layout"): for a
 * record position (row, col), g = row & 7, rh = row >> 3, j = col >> 4 (group), ch = (col >> 3) & 1,
 * t = (col >> 1) & 3, c = col & 1, fragment k = rh + 2*ch, lane L = 4g + t.
 *   b = 4, 2: word b*L + j / (4/b), pair p = 4*(j % (4/b)) + k, bits 16c + b*p.
 *   b = 3: CODE3_SLOTS[j][k] = (w, i): bits 16c + 3i of W_w (W0 = 2L, W1 = 2L+1, W2 = 64+L); the spread pair
 *          (j = 3, k = 3) has bit w of its code at bit 16c + 15 of W_w.
 *   stats: code n = 16g + 4j + 2*kind + rh (kind 0 scale, 1 zero) at bits [sb*n, sb*n + sb) of the
 *          little-endian bit string of words 32b .. 32b + 4sb.
 *   second: half 2m in the low 16 bits of word 32b + 4sb + m; group j's four numbers are halves 4j .. 4j+3.
 */
#include <stdlib.h>

#include "spqr_internal.h"

static const int8_t code3_slot[4][4][2] = {
    {{0, 0}, {1, 0}, {2, 0}, {0, 3}},
    {{1, 3}, {0, 1}, {2, 3}, {1, 1}},
    {{2, 1}, {0, 2}, {0, 4}, {1, 2}},
    {{1, 4}, {2, 2}, {2, 4}, {-1, -1}}, /* the spread pair */
};

/* Every code of one record as codes[row][col]. */
static void record_codes(const uint32_t *rec, int b, uint8_t codes[16][64]) {
  for (int row = 0; row < 16; row++) {
    int g = row & 7, rh = row >> 3;
    for (int col = 0; col < 64; col++) {
      int j = col >> 4, ch = (col >> 3) & 1, t = (col >> 1) & 3, c = col & 1;
      int k = rh + 2 * ch, lane = 4 * g + t;
      uint32_t v;
      if (b == 3) {
        const uint32_t w3[3] = {rec[2 * lane], rec[2 * lane + 1], rec[64 + lane]};
        int w = code3_slot[j][k][0], i = code3_slot[j][k][1];
        if (w >= 0) {
          v = (w3[w] >> (16 * c + 3 * i)) & 7;
        } else {
          v = 0;
          for (int bit = 0; bit < 3; bit++) v |= ((w3[bit] >> (16 * c + 15)) & 1) << bit;
        }
      } else {
        int per_word = 4 / b; /* groups a word holds */
        uint32_t word = rec[b * lane + j / per_word];
        int p = 4 * (j % per_word) + k;
        v = (word >> (16 * c + b * p)) & ((1u << b) - 1);
      }
      codes[row][col] = (uint8_t)v;
    }
  }
}

static uint32_t stat_code(const uint32_t *words, int sb, int n) {
  uint64_t bit = (uint64_t)sb * n;
  uint64_t lo = words[bit >> 5], hi = (bit >> 5) + 1 < (uint64_t)(4 * sb) ? words[(bit >> 5) + 1] : 0;
  uint64_t v = (lo | hi << 32) >> (bit & 31);
  return (uint32_t)(v & ((1u << sb) - 1));
}

/* The CPU layout of one record's codes (see spqr_internal.h). */
static void pack_codes(const uint8_t codes[16][64], int b, uint8_t *out) {
  memset(out, 0, 128 * (size_t)b);
  for (int q = 0; q < 16; q++) {
    for (int r = 0; r < 16; r++) {
      for (int c = 0; c < 4; c++) {
        uint8_t v = codes[r][4 * q + c];
        int byte = 4 * r + c;
        if (b == 4) {
          out[64 * (q >> 1) + byte] |= (uint8_t)(v << (4 * (q & 1)));
        } else if (b == 2) {
          out[64 * (q >> 2) + byte] |= (uint8_t)(v << (2 * (q & 3)));
        } else {
          uint8_t *a = out + 64 * (3 * (q >> 3)), *bb = a + 64, *cc = a + 128;
          switch (q & 7) {
            case 0: a[byte] |= v; break;
            case 1: a[byte] |= (uint8_t)(v << 3); break;
            case 2: a[byte] |= (uint8_t)((v & 3) << 6); cc[byte] |= (uint8_t)((v >> 2) << 6); break;
            case 3: bb[byte] |= v; break;
            case 4: bb[byte] |= (uint8_t)(v << 3); break;
            case 5: bb[byte] |= (uint8_t)((v & 3) << 6); cc[byte] |= (uint8_t)((v >> 2) << 7); break;
            case 6: cc[byte] |= v; break;
            default: cc[byte] |= (uint8_t)(v << 3); break;
          }
        }
      }
    }
  }
}

typedef struct {
  const int32_t *tiles;
  int32_t kb, b, sb, rwords;
  uint8_t *codes, *stats;
} repack_ctx;

static void repack_task(void *p, int64_t begin, int64_t end) {
  const repack_ctx *x = p;
  const int32_t sbytes = spqr_cpu_stat_block_bytes(x->sb), gbytes = spqr_stat_group_bytes(x->sb);
  uint8_t codes[16][64];
  for (int64_t r = begin; r < end; r++) { /* r = rt * KB + kb: one record */
    const uint32_t *rec = (const uint32_t *)x->tiles + r * x->rwords;
    record_codes(rec, x->b, codes);
    pack_codes(codes, x->b, x->codes + r * 128 * x->b);
    uint8_t *st = x->stats + r * sbytes;
    memset(st, 0, (size_t)sbytes);
    const uint32_t *sw = rec + 32 * x->b;
    for (int j = 0; j < 4; j++) {
      uint8_t *grp = st + j * gbytes;
      for (int row = 0; row < 16; row++) {
        int g = row & 7, rh = row >> 3;
        for (int kind = 0; kind < 2; kind++) {
          uint32_t v = stat_code(sw, x->sb, 16 * g + 4 * j + 2 * kind + rh);
          if (x->sb <= 4)
            grp[row] |= (uint8_t)(v << (4 * kind));
          else
            grp[16 * kind + row] = (uint8_t)v;
        }
      }
    }
    memcpy(st + 4 * gbytes, sw + 4 * x->sb, 32); /* 16 fp16, half 2m low in word m: little-endian bytes */
  }
}

int32_t spqr_cpu_stat_block_bytes(int32_t stat_bits) { return 4 * spqr_stat_group_bytes(stat_bits) + 32; }

int spqr_cpu_repack(const int32_t *tiles, int32_t row_tiles, int32_t k_blocks, int32_t wbits,
                    int32_t stat_bits, uint8_t *codes, uint8_t *stats) {
  if (wbits < 2 || wbits > 4 || stat_bits < 1 || stat_bits > 8) return -1;
  repack_ctx x = {tiles, k_blocks, wbits, stat_bits, 32 * wbits + 4 * stat_bits + 8, codes, stats};
  int64_t n = (int64_t)row_tiles * k_blocks;
  spqr_parallel_for(n, spqr_grain(n, 4), repack_task, &x);
  return 0;
}

/* ---- Q8: embedding / LM head ------------------------------------------------------------------------ */
void spqr_cpu_q8_rows(const spqr_weight *w, const int64_t *ids, int32_t n, float *out) {
  const int32_t in = w->in_features, kbn = w->k_blocks;
  for (int32_t i = 0; i < n; i++) {
    const int64_t r = ids[i];
    const uint8_t *tile = w->codes + (r >> 4) * (int64_t)kbn * 16 * 64 + 4 * (r & 15);
    const uint16_t *sc = w->scales + (r >> 4) * (int64_t)kbn * 16 + (r & 15);
    for (int32_t k = 0; k < in; k++)
      out[(int64_t)i * in + k] = spqr_half_to_float(sc[(k >> 6) * 16]) * (float)((int)tile[(k >> 2) * 64 + (k & 3)] - 128);
  }
}
