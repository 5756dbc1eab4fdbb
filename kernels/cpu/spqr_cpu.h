/* spqr_cpu.h: the plain C ABI of the CPU kernels (no libtorch, no Python API; called through ctypes).
 *
 * Three layers, one file stem each:
 *   spqr_repack.c    the `.spqr` GPU tile records -> the CPU layout below (once, at load)
 *   spqr_matmul*.c   y = x W^T from the packed bytes: a portable path and AVX2 / AVX-512 VNNI variants,
 *                    picked at run time (spqr_cpu_isa)
 *   spqr_decoder.c   one decoder forward (every layer, KV cache, LM head) in one call
 *   spqr_pool.c      the thread pool every parallel loop runs on
 *
 * CPU layout of an SpQR linear (docs/FORMAT.md, "CPU layout"): row tiles of 16 output rows, k-blocks of 64
 * stored (permuted) columns, as in the file, but each k-block's codes are "quads": 64 bytes holding, for the
 * 16 rows, 4 consecutive columns (byte 4*r + c = row r, column 4*q + c). An integer dot product of a quad
 * with 4 activation bytes broadcast to every 32-bit lane (AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw) then gives
 * 16 rows' partial sums in one instruction, with no horizontal reduction. b-bit codes are packed into 64-byte
 * chunks (spqr_matmul_common.h); stat codes are nibbles (stat_bits <= 4) or bytes; the 16 fp16 second-order
 * numbers of a k-block follow them.
 *
 * Activations: each matmul quantizes its input rows per group of 16 stored columns to int8 (symmetric,
 * absmax / 127), so y_r = sum_g s_rg dx_g (d_rg - z_rg * sum_j xq_j) with d_rg the integer dot of the codes
 * and xq (SpQR, Dettmers et al. 2024, eq. for the bilevel statistics; the factored form of DESIGN.md "Two
 * targets"). Outliers are added from the exact fp32 input.
 */
#ifndef SPQR_CPU_H
#define SPQR_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPQR_CPU_ABI_VERSION 6

/* ---- instruction sets ------------------------------------------------------------------------------- */
enum spqr_isa {
  SPQR_ISA_PORTABLE = 0, /* plain C */
  SPQR_ISA_AVX2 = 1,     /* AVX2 + FMA + F16C */
  SPQR_ISA_AVX512 = 2,   /* AVX-512 F/BW/VL/DQ + VNNI */
};

/* The best instruction set this CPU runs that the library was built with. */
int spqr_cpu_best_isa(void);
/* Select the variant every later call uses (tests run each); returns the ISA in effect (an unsupported
 * request falls back to the best supported one below it). */
int spqr_cpu_set_isa(int isa);
int spqr_cpu_isa(void);
int spqr_cpu_abi_version(void);

/* ---- thread pool ------------------------------------------------------------------------------------ */
/* Size the pool to `threads` (>= 1; the calling thread is one of them). Idle workers spin for about
 * `spin_us` microseconds after a parallel loop, then sleep on a futex. Returns the thread count. */
int spqr_cpu_set_threads(int threads, int spin_us);
int spqr_cpu_threads(void);
/* Run every parallel loop on the calling thread alone (1) or on the whole pool (0), without stopping the
 * workers (they spin, then sleep): what a caller picks when other processes make the pool slower than one
 * thread (spqr_run.cpu.governor). Results do not depend on it: a loop's chunks never change its output. */
void spqr_cpu_set_serial(int serial);

/* ---- weights ---------------------------------------------------------------------------------------- */
enum spqr_weight_kind {
  SPQR_W_NONE = 0,
  SPQR_W_SPQR = 1, /* CPU-layout SpQR: codes, stats, outliers, perm */
  SPQR_W_F32 = 2,  /* dense fp32 (out, in) row-major */
  SPQR_W_F16 = 3,  /* dense fp16 (out, in) row-major */
  SPQR_W_Q8 = 4,   /* int8 codes (w + 128 as uint8) in quads, an fp16 scale per row and 64 columns (the
                      embedding / LM head; llama.cpp's Q8_0 keeps one per 32) */
};

typedef struct spqr_weight {
  int32_t kind;
  int32_t out_features, in_features;
  int32_t wbits, stat_bits;      /* SPQR */
  int32_t row_tiles, k_blocks;   /* ceil(out/16), ceil(in/64) */
  int32_t act_residual;          /* SPQR: 1 = a second int8 pass over the activations' rounding residual
                                    (activations exact to ~2^-15 of their group maximum); Q8 always has it */
  const uint8_t *codes;          /* SPQR: (RT, KB, 128*wbits) bytes; Q8: (RT, 16*KB, 64) bytes (quads) */
  const uint8_t *stats;          /* SPQR: (RT, KB, stat_block_bytes) */
  const uint16_t *outlier_cols;  /* SPQR: (nnz,) stored column of each outlier, CSR order */
  const float *outlier_vals;     /* SPQR: (nnz,) its delta (fp32: the file's fp16, exactly) */
  const int32_t *outlier_row_ptr;/* SPQR: (RT*16 + 1,) */
  const uint16_t *perm;          /* SPQR: (in,) stored column j reads input perm[j]; NULL = identity */
  const uint16_t *scales;        /* Q8: (RT, KB, 16) fp16: row 16*rt + i, columns 64*kb .. +63 */
  const void *dense;             /* F32 / F16: (out, in) */
  const float *bias;             /* (out,) or NULL */
} spqr_weight;

/* Bytes of one k-block's stat section for `stat_bits` (nibbles up to 4 bits, else bytes; + 32 bytes of
 * second-order fp16). */
int32_t spqr_cpu_stat_block_bytes(int32_t stat_bits);

/* ---- repacking (spqr_repack.c) ---------------------------------------------------------------------- */
/* The `.spqr` records tiles (RT, KB, R) int32 -> codes (RT, KB, 128*wbits) and stats (RT, KB, stat block)
 * of the CPU layout. Returns 0, or -1 for unsupported wbits / stat_bits. Runs on the pool. */
int spqr_cpu_repack(const int32_t *tiles, int32_t row_tiles, int32_t k_blocks, int32_t wbits,
                    int32_t stat_bits, uint8_t *codes, uint8_t *stats);

/* Rows `ids` (n,) of a Q8 weight, dequantized to fp32 (n, in): the embedding lookup. */
void spqr_cpu_q8_rows(const spqr_weight *w, const int64_t *ids, int32_t n, float *out);

/* ---- matmul (spqr_matmul.c) ------------------------------------------------------------------------- */
/* y (rows, out) = x (rows, in) W^T + bias, fp32, row strides in elements. Every output element depends
 * only on its own input row (bit-identical whatever `rows` and the thread count). Returns 0 or -1. */
int spqr_cpu_matmul(const spqr_weight *w, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                    int32_t rows);

/* Per-row int8 quantization of x as the matmuls do it (for tests): x (rows, in) -> xq (rows, groups*16)
 * int8 and dx (rows, groups) fp32, groups = ceil(in / 16); columns are taken in `perm` order when given. */
void spqr_cpu_quantize_rows(const float *x, int64_t x_stride, int32_t rows, int32_t in, const uint16_t *perm,
                            int8_t *xq, float *dx);

/* ---- decoder (spqr_decoder.c) ----------------------------------------------------------------------- */
enum spqr_kv_kind { SPQR_KV_F32 = 0, SPQR_KV_INT8 = 1, SPQR_KV_F16 = 2 };

typedef struct spqr_layer {
  const float *attn_norm_w, *attn_norm_b; /* (hidden,) ; b NULL for RMSNorm */
  const float *mlp_norm_w, *mlp_norm_b;   /* NULL when the block shares one norm */
  spqr_weight in_proj[5];  /* linears reading a norm output; their outputs concatenate, in order, into
                              [q | k | v | gate | up] (up only for gelu): e.g. qkv + gate_up, or q, k, v,
                              gate, up, or Falcon-7B's one in_proj */
  int32_t in_proj_src[5];  /* 0: the attention norm's output, 1: the MLP norm's (sequential: after the
                              attention residual) */
  int32_t n_in_proj;
  spqr_weight o_proj, down_proj;
  /* KV cache of this layer: (rows, max_seq, kv_heads, head_dim) fp32, fp16, or int8 (+ fp32 scales (.., 1)) */
  void *k_cache, *v_cache;
  float *k_scale, *v_scale;
} spqr_layer;

typedef struct spqr_model {
  int32_t hidden, ffn, n_layers, n_heads, n_kv_heads, head_dim, vocab;
  int32_t norm_rms;        /* 1: RMSNorm, 0: LayerNorm (with bias) */
  int32_t mlp_gated;       /* 1: silu(gate) * up, 0: gelu(up) (erf form) */
  int32_t parallel;        /* 1: x + attn(norm(x)) + mlp(norm'(x)) */
  float norm_eps;
  int32_t kv_kind, kv_rows, kv_max_seq;
  const float *rope_cos, *rope_sin; /* (max_pos, head_dim/2) */
  int32_t rope_max_pos;
  spqr_weight embed;       /* SPQR_W_Q8 / F16 / F32 (vocab, hidden) */
  spqr_weight lm_head;     /* the tied embedding or its own */
  const float *final_norm_w, *final_norm_b;
  spqr_layer *layers;
} spqr_model;

/* logits (B, T_out, vocab) fp32 of tokens (B, T) at positions (B, T) in cache rows `rows` (B,) (NULL: 0..B-1),
 * attending to cached keys 0..position (causal) after writing this call's keys and values. T_out = T, or 1
 * with last_only. Returns 0, or -1 (bad arguments: token or position out of range). */
int spqr_cpu_forward(const spqr_model *m, const int64_t *tokens, const int64_t *positions,
                     const int64_t *rows, int32_t batch, int32_t seq, int32_t last_only, float *logits);

#ifdef __cplusplus
}
#endif
#endif
