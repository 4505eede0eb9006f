/* edgevlm native decode step: one token through a LLaMA-style decoder whose weights are ONNX Runtime
 * MatMulNBits blobs (4-bit or 8-bit, per-block scales), reading and writing the same shared KV buffers the
 * GroupQueryAttention graph uses for prefill.
 *
 * Why: at batch 1 a decode step is a chain of matrix-vector products over the whole weight set, so its speed is
 * the rate at which those weights stream from DRAM. ONNX Runtime 1.32's MatMulNBits kernel reaches ~60 % of the
 * measured read bandwidth at M = 1 on the reference machine (benchmarks/results/matmulnbits_ceiling.json); this
 * kernel streams the very same blobs with software prefetch and AVX-512 VNNI dot products.
 *
 * Numerics follow MatMulNBits with accuracy_level 4: the activation vector is quantized to int8 per weight block
 * (symmetric, scale = max|x| / 127), each block's integer dot product is scaled by (weight scale * activation
 * scale), and the zero point enters as zp * sum(x_q). Norms, RoPE (half rotation, as GroupQueryAttention with
 * rotary_interleaved = 0), softmax attention and SiLU run in fp32.
 *
 * Layouts (MatMulNBits): B [N, n_blocks, blk * bits / 8] uint8 (4-bit: element 2j in the low nibble of byte j,
 * 2j+1 in the high nibble), scales [N, n_blocks] fp32, optional zero points (4-bit: [N, ceil(n_blocks / 2)], two
 * per byte, low nibble first; 8-bit: [N, n_blocks]); defaults 8 / 128. KV buffers [kv_heads, max_len, head_dim]
 * fp32 (batch 1). Requirements checked by the Python side: 4-bit blk % 128 == 0, 8-bit blk % 64 == 0,
 * head_dim % 16 == 0.
 *
 * Built by edgevlm/runtime/native/build.py with -O3 -march=native -fopenmp; loaded with ctypes.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#ifndef EVLM_PREFETCH
#define EVLM_PREFETCH 4096 /* bytes ahead in the weight stream; measured best of 512..8192 on the reference host */
#endif

typedef struct {
    const uint8_t *B;      /* [N, nb, blk * bits / 8] */
    const float *scales;   /* [N, nb] */
    const uint8_t *zp;     /* NULL: symmetric (8 / 128) */
    int N, K, blk, bits;
} evlm_linear;

typedef struct {
    const float *ln1, *ln2;   /* [D] RMSNorm weights before attention / before the MLP */
    evlm_linear qkv;           /* packed [q | k | v] rows */
    evlm_linear o;
    evlm_linear gate_up;       /* fused [gate | up] rows, or gate only when up.B != NULL */
    evlm_linear up;
    evlm_linear down;
    float *k_cache, *v_cache;  /* [kv_heads, max_len, head_dim] */
} evlm_layer;

typedef struct {
    int num_layers, hidden, num_heads, kv_heads, head_dim, inter, vocab, max_len, rot_half, threads;
    float eps, scale;
    const float *cos_cache, *sin_cache; /* [max_pos, rot_half] */
    int max_pos;
    const float *ln_final;
    evlm_linear head;
    evlm_layer *layers;
    /* scratch, allocated by the caller */
    float *h, *xn, *qkv, *attn, *gu, *act, *scores; /* scores: [num_heads, max_len] */
    int8_t *xq;                                      /* [max padded K] */
    float *xs, *xc;                                  /* per-block activation scale, scale * sum(x_q) */
} evlm_model;

/* ---- activation quantization ------------------------------------------------------------------------------ */
/* x[K] -> int8 per block of blk (zero-padded to nb * blk); 4-bit layout puts even elements first, then odd, in
 * each block, to match the nibble order of the weight bytes. */
static void quant_x(const float *x, int K, int blk, int bits, int8_t *xq, float *xs, float *xc) {
    int nb = (K + blk - 1) / blk;
    for (int b = 0; b < nb; b++) {
        int k0 = b * blk;
        float amax = 0.f;
        for (int i = 0; i < blk; i++) {
            int k = k0 + i;
            float v = k < K ? fabsf(x[k]) : 0.f;
            amax = v > amax ? v : amax;
        }
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        int8_t *q = xq + (size_t)b * blk;
        for (int i = 0; i < blk; i++) {
            int k = k0 + i;
            int qi = k < K ? (int)lrintf(x[k] * inv) : 0;
            sum += qi;
            int at = bits == 4 ? ((i & 1) ? blk / 2 + (i >> 1) : (i >> 1)) : i;
            q[at] = (int8_t)qi;
        }
        xs[b] = amax / 127.f;
        xc[b] = xs[b] * (float)sum;
    }
}

static inline float zero_point(const evlm_linear *w, int n, int b, int nb) {
    if (!w->zp) return w->bits == 4 ? 8.f : 128.f;
    if (w->bits == 8) return (float)w->zp[(size_t)n * nb + b];
    uint8_t z = w->zp[(size_t)n * ((nb + 1) / 2) + b / 2];
    return (float)((b & 1) ? (z >> 4) : (z & 0x0F));
}

/* ---- y[N] = W x for one MatMulNBits weight; called by every thread of a parallel region (orphaned omp for) */
static void gemv(const evlm_linear *w, const int8_t *xq, const float *xs, const float *xc, float *y) {
    const int nb = (w->K + w->blk - 1) / w->blk;
    const int blk = w->blk;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    if (w->bits == 4) {
        const size_t rowbytes = (size_t)nb * blk / 2;
        const int chunks = blk / 128;
#pragma omp for schedule(static)
        for (int n = 0; n < w->N; n++) {
            const uint8_t *row = w->B + (size_t)n * rowbytes;
            const float *sw = w->scales + (size_t)n * nb;
            __m512 acc = _mm512_setzero_ps();
            float corr = 0.f;
            for (int b = 0; b < nb; b++) {
                const int8_t *q = xq + (size_t)b * blk;
                __m512i ai = _mm512_setzero_si512();
                for (int c = 0; c < chunks; c++) {
                    const uint8_t *p = row + (size_t)b * (blk / 2) + c * 64;
                    _mm_prefetch((const char *)p + EVLM_PREFETCH, _MM_HINT_T0);
                    __m512i v = _mm512_loadu_si512(p);
                    ai = _mm512_dpbusd_epi32(ai, _mm512_and_si512(v, m4), _mm512_loadu_si512(q + c * 64));
                    ai = _mm512_dpbusd_epi32(ai, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4),
                                             _mm512_loadu_si512(q + blk / 2 + c * 64));
                }
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), _mm512_set1_ps(sw[b] * xs[b]), acc);
                corr += sw[b] * xc[b] * zero_point(w, n, b, nb);
            }
            y[n] = _mm512_reduce_add_ps(acc) - corr;
        }
    } else {
        const size_t rowbytes = (size_t)nb * blk;
        const int chunks = blk / 64;
#pragma omp for schedule(static)
        for (int n = 0; n < w->N; n++) {
            const uint8_t *row = w->B + (size_t)n * rowbytes;
            const float *sw = w->scales + (size_t)n * nb;
            __m512 acc = _mm512_setzero_ps();
            float corr = 0.f;
            for (int b = 0; b < nb; b++) {
                const int8_t *q = xq + (size_t)b * blk;
                __m512i ai = _mm512_setzero_si512();
                for (int c = 0; c < chunks; c++) {
                    const uint8_t *p = row + (size_t)b * blk + c * 64;
                    _mm_prefetch((const char *)p + EVLM_PREFETCH, _MM_HINT_T0);
                    ai = _mm512_dpbusd_epi32(ai, _mm512_loadu_si512(p), _mm512_loadu_si512(q + c * 64));
                }
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), _mm512_set1_ps(sw[b] * xs[b]), acc);
                corr += sw[b] * xc[b] * zero_point(w, n, b, nb);
            }
            y[n] = _mm512_reduce_add_ps(acc) - corr;
        }
    }
}

/* quantize x (one thread) then y = W x (all threads); ends with the omp-for barrier */
static void linear(const evlm_model *m, const evlm_linear *w, const float *x, float *y) {
#pragma omp single
    quant_x(x, w->K, w->blk, w->bits, m->xq, m->xs, m->xc);
    gemv(w, m->xq, m->xs, m->xc, y);
}

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static void rope(float *v, const float *c, const float *s, int half) {
    for (int i = 0; i < half; i++) {
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i] + x1 * s[i];
    }
}

static inline float dot16(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
}

static inline void axpy16(float a, const float *x, float *y, int n) {
    __m512 va = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i),
                                                                            _mm512_loadu_ps(y + i)));
}

/* One decode step. x: the new token's embedding [hidden]; pos: tokens already in the KV cache (the new token's
 * position); logits: [vocab]. Returns 0, or -1 when pos is outside the KV buffer / rotary table. */
int evlm_decode_step(const evlm_model *m, const float *x, int pos, float *logits) {
    if (pos < 0 || pos >= m->max_len || pos >= m->max_pos) return -1;
    const int D = m->hidden, hd = m->head_dim, H = m->num_heads, KVH = m->kv_heads, T = pos + 1;
    const int group = H / KVH;
    memcpy(m->h, x, sizeof(float) * (size_t)D);
#pragma omp parallel num_threads(m->threads)
    {
        for (int l = 0; l < m->num_layers; l++) {
            const evlm_layer *L = &m->layers[l];
            /* attention block: xn = rmsnorm(h); qkv = Wqkv xn */
#pragma omp single
            rmsnorm(m->h, L->ln1, D, m->eps, m->xn);
            linear(m, &L->qkv, m->xn, m->qkv);
            /* rotary on q and k, append k / v at row pos */
#pragma omp single
            {
                const float *c = m->cos_cache + (size_t)pos * m->rot_half;
                const float *s = m->sin_cache + (size_t)pos * m->rot_half;
                for (int h = 0; h < H + KVH; h++) rope(m->qkv + (size_t)h * hd, c, s, m->rot_half);
                for (int h = 0; h < KVH; h++) {
                    memcpy(L->k_cache + ((size_t)h * m->max_len + pos) * hd, m->qkv + (size_t)(H + h) * hd,
                           sizeof(float) * hd);
                    memcpy(L->v_cache + ((size_t)h * m->max_len + pos) * hd, m->qkv + (size_t)(H + KVH + h) * hd,
                           sizeof(float) * hd);
                }
            }
            /* softmax(q K^T * scale) V, one head per iteration */
#pragma omp for schedule(static)
            for (int h = 0; h < H; h++) {
                const float *q = m->qkv + (size_t)h * hd;
                const float *K = L->k_cache + (size_t)(h / group) * m->max_len * hd;
                const float *V = L->v_cache + (size_t)(h / group) * m->max_len * hd;
                float *sc = m->scores + (size_t)h * m->max_len;
                float mx = -INFINITY;
                for (int t = 0; t < T; t++) {
                    sc[t] = dot16(q, K + (size_t)t * hd, hd) * m->scale;
                    mx = sc[t] > mx ? sc[t] : mx;
                }
                float sum = 0.f;
                for (int t = 0; t < T; t++) {
                    sc[t] = expf(sc[t] - mx);
                    sum += sc[t];
                }
                float *out = m->attn + (size_t)h * hd;
                memset(out, 0, sizeof(float) * hd);
                float inv = 1.f / sum;
                for (int t = 0; t < T; t++) axpy16(sc[t] * inv, V + (size_t)t * hd, out, hd);
            }
            linear(m, &L->o, m->attn, m->xn);
            /* residual, MLP block */
#pragma omp single
            {
                for (int i = 0; i < D; i++) m->h[i] += m->xn[i];
                rmsnorm(m->h, L->ln2, D, m->eps, m->xn);
            }
            linear(m, &L->gate_up, m->xn, m->gu);
            if (L->up.B) gemv(&L->up, m->xq, m->xs, m->xc, m->gu + m->inter);   /* same input, same quantization */
#pragma omp for schedule(static)
            for (int i = 0; i < m->inter; i++) {
                float g = m->gu[i];
                m->act[i] = g / (1.f + expf(-g)) * m->gu[m->inter + i];
            }
            linear(m, &L->down, m->act, m->xn);
#pragma omp single
            for (int i = 0; i < D; i++) m->h[i] += m->xn[i];
        }
#pragma omp single
        rmsnorm(m->h, m->ln_final, D, m->eps, m->xn);
        linear(m, &m->head, m->xn, logits);
    }
    return 0;
}

/* The block quantization alone (for tests of the Python-side reference). */
void evlm_quant_x(const float *x, int K, int blk, int bits, int8_t *xq, float *xs, float *xc) {
    quant_x(x, K, blk, bits, xq, xs, xc);
}

/* One matrix-vector product (for tests and the kernel benchmark). */
void evlm_gemv(const evlm_linear *w, const float *x, float *y, int8_t *xq, float *xs, float *xc, int threads) {
    quant_x(x, w->K, w->blk, w->bits, xq, xs, xc);
#pragma omp parallel num_threads(threads)
    gemv(w, xq, xs, xc, y);
}

int evlm_abi_version(void) { return 1; }
