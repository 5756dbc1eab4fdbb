/* spqr_decoder.c: one decoder forward on the CPU, every layer in one call (no Python per layer).
 *
 * The same computation as spqr_run/models/decoder.py (LLaMA family and Falcon as config flags), for B rows
 * of T tokens each, with the KV cache written in place:
 *   h = norm(x);  [q | k | v | gate | up] = in_proj(h);  rotary(q, k);  cache[row, pos] = k, v
 *   a = o_proj(attention(q, cache[row, 0 .. pos]))
 *   sequential: x += a; x += down(act(norm'(x)))      parallel: x += a + down(act(norm'(x_in)))
 * and the final norm + LM head on every token (or each row's last). Every token's result depends only on its
 * own row's tokens and cache (bit-identical whatever else runs in the batch; attention reads keys 0 .. pos).
 */
#include <math.h>
#include <stdlib.h>

#include "spqr_internal.h"

/* The attention loops (dot products over head_dim) are inlined into `attention_task`, which is cloned per
 * instruction set once (SPQR_VEC_CLONES), not per call. Sums use 16 partial sums in a fixed order. */
#define VEC_CLONES SPQR_VEC_CLONES

static inline float reduce16(float acc[16]) {
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; l++) acc[l] += acc[l + w];
  return acc[0];
}

/* sum_i a[i] b[i] */
static inline float dot_f32(const float *a, const float *b, int32_t n) {
  float acc[16] = {0};
  int32_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; l++) acc[l] = fmaf(a[i + l], b[i + l], acc[l]);
  for (int l = 0; i + l < n; l++) acc[l] = fmaf(a[i + l], b[i + l], acc[l]);
  return reduce16(acc);
}

static inline float dot_f32_i8(const float *a, const int8_t *b, int32_t n) {
  float acc[16] = {0};
  int32_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; l++) acc[l] = fmaf(a[i + l], (float)b[i + l], acc[l]);
  for (int l = 0; i + l < n; l++) acc[l] = fmaf(a[i + l], (float)b[i + l], acc[l]);
  return reduce16(acc);
}

/* fp16 cache reads: `_Float16` converts with one vcvtph2ps per 8 or 16 values in the F16C clones (exact,
 * as spqr_half_to_float); compilers without it use the bit-level conversion */
#if defined(__FLT16_MAX__)
typedef _Float16 half_t;
#define HALF(p, i) ((float)(p)[i])
#else
typedef uint16_t half_t;
#define HALF(p, i) spqr_half_to_float((p)[i])
#endif

static inline float dot_f32_f16(const float *a, const half_t *b, int32_t n) {
  float acc[16] = {0};
  int32_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; l++) acc[l] = fmaf(a[i + l], HALF(b, i + l), acc[l]);
  for (int l = 0; i + l < n; l++) acc[l] = fmaf(a[i + l], HALF(b, i + l), acc[l]);
  return reduce16(acc);
}

static inline void axpy_f16(float a, const half_t *x, float *y, int32_t n) {
  for (int32_t i = 0; i < n; i++) y[i] = fmaf(a, HALF(x, i), y[i]);
}

/* y += a x */
static inline void axpy_f32(float a, const float *x, float *y, int32_t n) {
  for (int32_t i = 0; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

static inline void axpy_i8(float a, const int8_t *x, float *y, int32_t n) {
  for (int32_t i = 0; i < n; i++) y[i] = fmaf(a, (float)x[i], y[i]);
}

/* exp(x) to about 2 ulp for finite x (range reduction by ln 2, degree-6 polynomial: the Cephes expf
 * coefficients), written without calls or branches so the loops below vectorize. */
static inline float exp_poly(float x) {
  x = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x; /* 2^-126 .. 2^127: normal results */
  const float n = nearbyintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, x);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, r * r, r) + 1.f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return p * scale;
}

VEC_CLONES void spqr_vec_exp(float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] = exp_poly(x[i]);
}

VEC_CLONES void spqr_vec_silu_mul(float *gate, const float *up, int64_t n) {
  for (int64_t i = 0; i < n; i++) gate[i] = gate[i] / (1.f + exp_poly(-gate[i])) * up[i];
}

typedef struct {
  const spqr_model *m;
  const int64_t *tokens, *positions, *rows;
  int32_t batch, seq;
  float *x, *h, *h2, *proj, *att;
  int64_t proj_stride;
  const float *nw, *nb; /* the norm being applied */
  float *norm_out;
  const spqr_layer *layer;
} fwd_ctx;

/* fp32 -> fp16 as the KV cache stores it (exported for the tests) */
void spqr_float_to_half_array(const float *x, uint16_t *out, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = spqr_float_to_half(x[i]);
}

/* ---- norms ------------------------------------------------------------------------------------------ */
static void norm_row(const spqr_model *m, const float *x, const float *w, const float *b, float *out) {
  const int32_t n = m->hidden;
  if (m->norm_rms) {
    float ss = 0.f;
    for (int32_t i = 0; i < n; i++) ss = fmaf(x[i], x[i], ss);
    const float r = 1.f / sqrtf(ss / (float)n + m->norm_eps);
    for (int32_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
  } else {
    float mean = 0.f, var = 0.f;
    for (int32_t i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
    for (int32_t i = 0; i < n; i++) var = fmaf(x[i] - mean, x[i] - mean, var);
    const float r = 1.f / sqrtf(var / (float)n + m->norm_eps);
    for (int32_t i = 0; i < n; i++) out[i] = (x[i] - mean) * r * w[i] + (b ? b[i] : 0.f);
  }
}

static void norm_task(void *p, int64_t b, int64_t e) {
  const fwd_ctx *c = p;
  const int32_t n = c->m->hidden;
  for (int64_t i = b; i < e; i++) norm_row(c->m, c->x + i * n, c->nw, c->nb, c->norm_out + i * n);
}

static void apply_norm(fwd_ctx *c, const float *w, const float *b, float *out, int64_t tokens) {
  c->nw = w;
  c->nb = b;
  c->norm_out = out;
  spqr_parallel_for(tokens, spqr_grain(tokens, 2), norm_task, c);
}

/* ---- rotary + cache write ----------------------------------------------------------------------------- */
static void rope(float *v, int32_t heads, int32_t hd, const float *cos, const float *sin) {
  const int32_t half = hd / 2;
  for (int32_t h = 0; h < heads; h++) {
    float *x = v + h * hd;
    for (int32_t i = 0; i < half; i++) {
      const float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * cos[i] - x2 * sin[i];
      x[i + half] = x2 * cos[i] + x1 * sin[i];
    }
  }
}

/* int8 cache: one fp32 scale per (token, head), symmetric absmax (spqr_run/models/kv_cache.py) */
static void store_int8(const float *x, int32_t hd, int8_t *codes, float *scale) {
  float amax = 0.f;
  for (int32_t i = 0; i < hd; i++) amax = fmaxf(amax, fabsf(x[i]));
  const float s = amax / 127.f, safe = s > 1.17549435e-38f ? s : 1.17549435e-38f;
  *scale = s;
  for (int32_t i = 0; i < hd; i++) codes[i] = (int8_t)fminf(fmaxf(nearbyintf(x[i] / safe), -127.f), 127.f);
}

static void rope_cache_task(void *p, int64_t b, int64_t e) {
  const fwd_ctx *c = p;
  const spqr_model *m = c->m;
  const spqr_layer *L = c->layer;
  const int32_t hd = m->head_dim, kvd = m->n_kv_heads * hd, qd = m->n_heads * hd;
  for (int64_t n = b; n < e; n++) {
    const int64_t pos = c->positions[n], row = c->rows ? c->rows[n / c->seq] : n / c->seq;
    float *q = c->proj + n * c->proj_stride, *k = q + qd, *v = k + kvd;
    const float *cos = m->rope_cos + pos * (hd / 2), *sin = m->rope_sin + pos * (hd / 2);
    rope(q, m->n_heads, hd, cos, sin);
    rope(k, m->n_kv_heads, hd, cos, sin);
    const int64_t at = (row * m->kv_max_seq + pos) * kvd;
    if (m->kv_kind == SPQR_KV_F32) {
      memcpy((float *)L->k_cache + at, k, sizeof(float) * kvd);
      memcpy((float *)L->v_cache + at, v, sizeof(float) * kvd);
    } else if (m->kv_kind == SPQR_KV_F16) {
      for (int64_t i = 0; i < kvd; i++) {
        ((uint16_t *)L->k_cache)[at + i] = spqr_float_to_half(k[i]);
        ((uint16_t *)L->v_cache)[at + i] = spqr_float_to_half(v[i]);
      }
    } else {
      for (int32_t h = 0; h < m->n_kv_heads; h++) {
        const int64_t s = (row * m->kv_max_seq + pos) * m->n_kv_heads + h;
        store_int8(k + h * hd, hd, (int8_t *)L->k_cache + at + h * hd, L->k_scale + s);
        store_int8(v + h * hd, hd, (int8_t *)L->v_cache + at + h * hd, L->v_scale + s);
      }
    }
  }
}

/* ---- attention ----------------------------------------------------------------------------------------
 * A task is one row b, one KV head g and a block of up to QB of the row's query tokens; each query attends to
 * its row's keys 0 .. its position. One query (decode): dot products over head_dim. Several (prefill): the
 * queries are transposed once, then for each key the scores of all of them come from head_dim fmas with
 * the queries in the lanes (each key row read once, no horizontal sums), and softmax runs across the lanes
 * too. The two orders of summation differ in the last bits; a given call shape always takes the same one. */
#define QB 16

static inline float key_scale(const spqr_layer *L, int int8, int64_t at) { return int8 ? L->k_scale[at] : 1.f; }

VEC_CLONES static void attend_one(const fwd_ctx *c, int64_t n, int32_t g, float *scores) {
  const spqr_model *m = c->m;
  const spqr_layer *L = c->layer;
  const int32_t hd = m->head_dim, kvh = m->n_kv_heads, group = m->n_heads / m->n_kv_heads;
  const float scale = 1.f / sqrtf((float)hd);
  const int int8 = m->kv_kind == SPQR_KV_INT8, f16 = m->kv_kind == SPQR_KV_F16;
  const int64_t pos = c->positions[n], row = c->rows ? c->rows[n / c->seq] : n / c->seq;
  const int64_t base = row * m->kv_max_seq * kvh + g; /* (row, s, g) = base + s * kvh */
  const float *q = c->proj + n * c->proj_stride + (int64_t)g * group * hd;
  float *out = c->att + n * (int64_t)m->n_heads * hd + (int64_t)g * group * hd;
  const int64_t keys = pos + 1;
  for (int64_t s = 0; s < keys; s++) { /* each key row read once for the whole group */
    const int64_t at = (base + s * kvh) * hd;
    for (int32_t h = 0; h < group; h++) {
      float dot = int8 ? dot_f32_i8(q + h * hd, (const int8_t *)L->k_cache + at, hd) * L->k_scale[base + s * kvh]
                  : f16 ? dot_f32_f16(q + h * hd, (const half_t *)L->k_cache + at, hd)
                        : dot_f32(q + h * hd, (const float *)L->k_cache + at, hd);
      scores[h * keys + s] = dot * scale;
    }
  }
  for (int32_t h = 0; h < group; h++) {
    float *sc = scores + h * keys, mx = -INFINITY, sum = 0.f;
    for (int64_t s = 0; s < keys; s++) mx = sc[s] > mx ? sc[s] : mx;
    for (int64_t s = 0; s < keys; s++) sc[s] -= mx;
    spqr_vec_exp(sc, keys);
    for (int64_t s = 0; s < keys; s++) sum += sc[s];
    const float inv = 1.f / sum;
    for (int64_t s = 0; s < keys; s++) sc[s] *= inv;
    memset(out + h * hd, 0, sizeof(float) * hd);
  }
  for (int64_t s = 0; s < keys; s++) {
    const int64_t at = (base + s * kvh) * hd;
    for (int32_t h = 0; h < group; h++) {
      if (int8)
        axpy_i8(scores[h * keys + s] * L->v_scale[base + s * kvh], (const int8_t *)L->v_cache + at, out + h * hd, hd);
      else if (f16)
        axpy_f16(scores[h * keys + s], (const half_t *)L->v_cache + at, out + h * hd, hd);
      else
        axpy_f32(scores[h * keys + s], (const float *)L->v_cache + at, out + h * hd, hd);
    }
  }
}

/* 16 fp32 lanes (one zmm, two ymm or four xmm, per clone) */
typedef float lanes16 __attribute__((vector_size(64)));

#define LOAD16(dst, p) memcpy(&(dst), (p), sizeof(lanes16))

/* Queries n0 .. n0 + nq - 1 (one row, nq <= QB), KV head g. buf: hd*QB + keys*QB floats. Contraction on here
 * only (acc += k * q becomes one fma where the clone has them). */
__attribute__((optimize("fp-contract=fast"))) VEC_CLONES static void attend_block(const fwd_ctx *c, int64_t n0, int32_t nq, int32_t g, float *buf) {
  const spqr_model *m = c->m;
  const spqr_layer *L = c->layer;
  const int32_t hd = m->head_dim, kvh = m->n_kv_heads, group = m->n_heads / m->n_kv_heads;
  const float scale = 1.f / sqrtf((float)hd);
  const int int8 = m->kv_kind == SPQR_KV_INT8, f16 = m->kv_kind == SPQR_KV_F16;
  const int64_t row = c->rows ? c->rows[n0 / c->seq] : n0 / c->seq;
  const int64_t base = row * m->kv_max_seq * kvh + g;
  int64_t maxpos = 0;
  float limit[QB]; /* last key of each lane's query (-1: an empty lane) */
  for (int l = 0; l < QB; l++) {
    const int64_t p = l < nq ? c->positions[n0 + l] : -1;
    limit[l] = (float)p;
    maxpos = p > maxpos ? p : maxpos;
  }
  const int64_t keys = maxpos + 1;
  float *qt = buf, *st = buf + hd * QB; /* qt[d][lane]; st[s][lane] */
  for (int32_t h = 0; h < group; h++) {
    const int64_t qoff = (int64_t)(g * group + h) * hd;
    for (int32_t d = 0; d < hd; d++)
      for (int l = 0; l < QB; l++) qt[d * QB + l] = l < nq ? c->proj[(n0 + l) * c->proj_stride + qoff + d] : 0.f;
    float mx[QB], sum[QB];
    for (int l = 0; l < QB; l++) mx[l] = -INFINITY, sum[l] = 0.f;
    for (int64_t s = 0; s < keys; s++) {
      const int64_t at = (base + s * kvh) * hd;
      const float ks = key_scale(L, int8, base + s * kvh);
      lanes16 acc = {0}, qd;
      if (int8) {
        for (int32_t d = 0; d < hd; d++) {
          LOAD16(qd, qt + d * QB);
          acc += (float)((const int8_t *)L->k_cache)[at + d] * qd;
        }
      } else if (f16) {
        for (int32_t d = 0; d < hd; d++) {
          LOAD16(qd, qt + d * QB);
          acc += HALF((const half_t *)L->k_cache, at + d) * qd;
        }
      } else {
        for (int32_t d = 0; d < hd; d++) {
          LOAD16(qd, qt + d * QB);
          acc += ((const float *)L->k_cache)[at + d] * qd;
        }
      }
      for (int l = 0; l < QB; l++) {
        const float v = (float)s <= limit[l] ? acc[l] * ks * scale : -INFINITY;
        st[s * QB + l] = v;
        mx[l] = v > mx[l] ? v : mx[l];
      }
    }
    for (int64_t s = 0; s < keys; s++) {
      for (int l = 0; l < QB; l++) {
        const float v = (float)s <= limit[l] ? exp_poly(st[s * QB + l] - mx[l]) : 0.f;
        st[s * QB + l] = v;
        sum[l] += v;
      }
    }
    for (int l = 0; l < nq; l++) {
      float *out = c->att + (n0 + l) * (int64_t)m->n_heads * hd + qoff;
      const float inv = 1.f / sum[l];
      memset(out, 0, sizeof(float) * hd);
      for (int64_t s = 0; s <= (int64_t)limit[l]; s++) {
        const int64_t at = (base + s * kvh) * hd;
        if (int8)
          axpy_i8(st[s * QB + l] * inv * L->v_scale[base + s * kvh], (const int8_t *)L->v_cache + at, out, hd);
        else if (f16)
          axpy_f16(st[s * QB + l] * inv, (const half_t *)L->v_cache + at, out, hd);
        else
          axpy_f32(st[s * QB + l] * inv, (const float *)L->v_cache + at, out, hd);
      }
    }
  }
}

static void attention_task(void *p, int64_t b, int64_t e) {
  const fwd_ctx *c = p;
  const spqr_model *m = c->m;
  const int64_t blocks = (c->seq + QB - 1) / QB, kvh = m->n_kv_heads;
  const int32_t group = m->n_heads / m->n_kv_heads;
  const size_t floats = c->seq == 1 ? (size_t)m->kv_max_seq * group : (size_t)(m->head_dim + m->kv_max_seq) * QB;
  float *buf = malloc(sizeof(float) * floats);
  if (!buf) return;
  for (int64_t i = b; i < e; i++) { /* i = (row b, query block, kv head) */
    const int32_t g = (int32_t)(i % kvh);
    const int64_t blk = i / kvh % blocks, rowb = i / kvh / blocks;
    const int64_t n0 = rowb * c->seq + blk * QB;
    const int32_t nq = (int32_t)(c->seq - blk * QB < QB ? c->seq - blk * QB : QB);
    if (c->seq == 1)
      attend_one(c, n0, g, buf);
    else
      attend_block(c, n0, nq, g, buf);
  }
  free(buf);
}

/* ---- MLP activation, in place in the gate (gated) or up columns of proj -------------------------------- */
static void act_task(void *p, int64_t b, int64_t e) {
  const fwd_ctx *c = p;
  const spqr_model *m = c->m;
  const int64_t off = (int64_t)m->n_heads * m->head_dim + 2 * (int64_t)m->n_kv_heads * m->head_dim;
  for (int64_t n = b; n < e; n++) {
    float *g = c->proj + n * c->proj_stride + off;
    if (m->mlp_gated) {
      spqr_vec_silu_mul(g, g + m->ffn, m->ffn);
    } else {
      for (int32_t i = 0; i < m->ffn; i++) g[i] = 0.5f * g[i] * (1.f + erff(g[i] * 0.70710678118654752f));
    }
  }
}

static int run_linear(const spqr_weight *w, const float *x, int64_t xs, float *y, int64_t ys, int32_t rows) {
  return spqr_cpu_matmul(w, x, xs, y, ys, rows);
}

int spqr_cpu_forward(const spqr_model *m, const int64_t *tokens, const int64_t *positions, const int64_t *rows,
                     int32_t batch, int32_t seq, int32_t last_only, float *logits) {
  const int64_t N = (int64_t)batch * seq;
  const int32_t H = m->hidden, hd = m->head_dim;
  const int64_t qd = (int64_t)m->n_heads * hd, kvd = (int64_t)m->n_kv_heads * hd;
  const int64_t P = qd + 2 * kvd + (m->mlp_gated ? 2 : 1) * (int64_t)m->ffn;
  if (N <= 0) return 0;
  for (int64_t n = 0; n < N; n++) {
    if (tokens[n] < 0 || tokens[n] >= m->vocab) return -1;
    if (positions[n] < 0 || positions[n] >= m->kv_max_seq || positions[n] >= m->rope_max_pos) return -1;
  }
  if (rows)
    for (int32_t b = 0; b < batch; b++)
      if (rows[b] < 0 || rows[b] >= m->kv_rows) return -1;
  /* activations: x, h, h2, ao, mo (N, H); proj (N, P); att (N, qd) */
  size_t bytes = sizeof(float) * (size_t)N * (5 * (size_t)H + (size_t)P + (size_t)qd) + 64 * 8;
  float *buf = spqr_scratch(SPQR_SCRATCH_DECODER, bytes);
  if (!buf) return -1;
  fwd_ctx c = {.m = m, .tokens = tokens, .positions = positions, .rows = rows, .batch = batch, .seq = seq};
  c.x = buf;
  c.h = c.x + N * H;
  c.h2 = c.h + N * H;
  float *ao = c.h2 + N * H, *mo = ao + N * H;
  c.proj = mo + N * H;
  c.proj_stride = P;
  c.att = c.proj + N * P;

  /* embedding */
  if (m->embed.kind == SPQR_W_Q8) {
    spqr_cpu_q8_rows(&m->embed, tokens, (int32_t)N, c.x);
  } else {
    for (int64_t n = 0; n < N; n++)
      for (int32_t i = 0; i < H; i++)
        c.x[n * H + i] = m->embed.kind == SPQR_W_F32
                             ? ((const float *)m->embed.dense)[tokens[n] * H + i]
                             : spqr_half_to_float(((const uint16_t *)m->embed.dense)[tokens[n] * H + i]);
  }

  for (int32_t li = 0; li < m->n_layers; li++) {
    const spqr_layer *L = &m->layers[li];
    c.layer = L;
    apply_norm(&c, L->attn_norm_w, L->attn_norm_b, c.h, N);
    int64_t off = 0;
    for (int i = 0; i < L->n_in_proj; i++) {
      if (L->in_proj_src[i] == 0 && run_linear(&L->in_proj[i], c.h, H, c.proj + off, P, (int32_t)N)) return -1;
      off += L->in_proj[i].out_features;
    }
    spqr_parallel_for(N, spqr_grain(N, 2), rope_cache_task, &c);
    const int64_t tasks = (int64_t)batch * ((seq + QB - 1) / QB) * m->n_kv_heads;
    spqr_parallel_for(tasks, spqr_grain(tasks, 4), attention_task, &c);
    if (run_linear(&L->o_proj, c.att, qd, ao, H, (int32_t)N)) return -1;
    const float *mlp_in;
    if (m->parallel) {
      if (L->mlp_norm_w) apply_norm(&c, L->mlp_norm_w, L->mlp_norm_b, c.h2, N);
      mlp_in = L->mlp_norm_w ? c.h2 : c.h;
    } else {
      for (int64_t i = 0; i < N * H; i++) c.x[i] += ao[i];
      apply_norm(&c, L->mlp_norm_w, L->mlp_norm_b, c.h2, N);
      mlp_in = c.h2;
    }
    off = 0;
    for (int i = 0; i < L->n_in_proj; i++) {
      if (L->in_proj_src[i] == 1 && run_linear(&L->in_proj[i], mlp_in, H, c.proj + off, P, (int32_t)N)) return -1;
      off += L->in_proj[i].out_features;
    }
    spqr_parallel_for(N, spqr_grain(N, 2), act_task, &c);
    if (run_linear(&L->down_proj, c.proj + qd + 2 * kvd, P, mo, H, (int32_t)N)) return -1;
    if (m->parallel) {
      for (int64_t i = 0; i < N * H; i++) c.x[i] = c.x[i] + ao[i] + mo[i];
    } else {
      for (int64_t i = 0; i < N * H; i++) c.x[i] += mo[i];
    }
  }

  /* final norm and LM head, on every token or each row's last */
  const int64_t out_rows = last_only ? batch : N;
  for (int64_t r = 0; r < out_rows; r++) {
    const int64_t n = last_only ? r * seq + (seq - 1) : r;
    norm_row(m, c.x + n * H, m->final_norm_w, m->final_norm_b, c.h + r * H);
  }
  return run_linear(&m->lm_head, c.h, H, logits, m->vocab, (int32_t)out_rows);
}

