/* edgevlm native decode step: one token through a LLaMA-style decoder whose weights are ONNX Runtime
 * MatMulNBits blobs (4-bit or 8-bit, per-block scales), reading and writing the same shared KV buffers the
 * GroupQueryAttention graph uses for prefill. Optionally attention reads an fp16 copy of the cache (half the bytes per
 * step; filled from the fp32 rows by evlm_kv_sync after a prefill, and written alongside them by every step).
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
 * Threading: one OpenMP parallel region per step. Each matmul's rows are split into one contiguous run per thread,
 * with work stealing at the tail (see the row scheduler), and the small vector work between matmuls (norms,
 * activation quantization, residual adds) is done redundantly by every thread on private copies, so a step has six
 * barriers per layer instead of one per stage.
 *
 * Layouts (MatMulNBits): B [N, n_blocks, blk * bits / 8] uint8 (4-bit: element 2j in the low nibble of byte j,
 * 2j+1 in the high nibble), scales [N, n_blocks] fp32, optional zero points (4-bit: [N, ceil(n_blocks / 2)], two
 * per byte, low nibble first; 8-bit: [N, n_blocks]); defaults 8 / 128. KV buffers [kv_heads, max_len, head_dim]
 * fp32 (batch 1). Requirements checked by the Python side: 4-bit blk % 128 == 0, 8-bit blk % 64 == 0,
 * head_dim % 16 == 0.
 *
 * Built ahead of time into one shared library per instruction set (setup.py: AVX-512 VNNI and AVX2 + FMA + F16C
 * on x86-64, NEON + dot product on ARM64; edgevlm/runtime/native/variants.py has the flags), or on demand by
 * edgevlm/runtime/native/build.py with -O3 -march=native -fopenmp; loaded with ctypes, which picks the variant by the
 * CPU's flags at run time.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

/* Which code path: chosen at compile time by the target's ISA macros (explicit -m flags for the prebuilt variants,
 * -march=native for the on-demand build; with -mno-avx512f where edgevlm's dispatch hides AVX-512). The AVX-512
 * VNNI path is the reference; the AVX2 + FMA path computes the same integer dot products with vpmaddubsw + vpmaddwd
 * (no saturation: 4-bit weights are 0..15, 8-bit weights are re-centred to -128..127 and multiplied with the sign
 * trick); the ARM64 path computes them with NEON sdot (vdotq_s32, signed x signed: the 4-bit nibbles 0..15 are
 * already signed bytes, 8-bit weights are re-centred to -128..127 as on the AVX2 path). The paths differ only in
 * float summation order. evlm_isa() says which one was compiled. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define EVLM_ISA 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EVLM_ISA 2
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define EVLM_ISA 3
#else
#error "the native decode kernel needs AVX-512 VNNI, AVX2 + FMA + F16C, or ARM64 NEON + dot product (armv8.2-a+dotprod)"
#endif
#define EVLM_AVX512 (EVLM_ISA == 1)
#define EVLM_AVX2 (EVLM_ISA == 2)
#define EVLM_NEON (EVLM_ISA == 3)

/* The sha256 of this file (its first 16 hex digits), defined by whoever compiles it (setup.py, build.py): the loader
 * refuses a prebuilt library whose source is not the decode.c beside it (an editable install edited since). */
#ifndef EVLM_SOURCE_SHA
#define EVLM_SOURCE_SHA "unknown"
#endif

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
    float *k_cache, *v_cache;  /* [kv_heads, max_len, head_dim]: the ONNX Runtime session's buffers */
    uint16_t *k16, *v16;       /* the same layout in fp16 (attention reads these), or NULL: read the fp32 ones */
} evlm_layer;

typedef struct {
    int num_layers, hidden, num_heads, kv_heads, head_dim, inter, vocab, max_len, rot_half, threads;
    float eps, scale;
    const float *cos_cache, *sin_cache; /* [max_pos, rot_half] */
    int max_pos;
    const float *ln_final;
    evlm_linear head;
    evlm_layer *layers;
    /* scratch, allocated by the caller. Shared: qkv, attn, y, gu, act, scores. Per thread (stride in elements):
     * h, xn [threads, hidden]; xq [threads, xq_stride]; xs, xc [threads, xs_stride]; ranges: threads * 128 bytes
     * (64-byte aligned inside) for the row scheduler. */
    float *h, *xn, *qkv, *attn, *y, *gu, *act, *scores; /* scores: [num_heads, max_len] */
    int8_t *xq;
    float *xs, *xc;
    int xq_stride, xs_stride;
    uint64_t *ranges;
} evlm_model;

/* ---- activation quantization ------------------------------------------------------------------------------ */
/* One block, scalar: the reference for tail blocks (K not a multiple of blk). */
static void quant_block_scalar(const float *x, int n, int blk, int bits, int8_t *q, float *xs, float *xc) {
    float amax = 0.f;
    for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int i = 0; i < blk; i++) {
        int qi = i < n ? (int)lrintf(x[i] * inv) : 0;
        sum += qi;
        q[bits == 4 ? ((i & 1) ? blk / 2 + (i >> 1) : (i >> 1)) : i] = (int8_t)qi;
    }
    *xs = amax / 127.f;
    *xc = *xs * (float)sum;
}

/* x[K] -> int8 per block of blk (zero-padded to nb * blk); 4-bit layout puts even elements first, then odd, in
 * each block, to match the nibble order of the weight bytes. Full blocks are vectorized: cvtps rounds to nearest
 * even like lrintf, so both paths give the same codes. */
#if EVLM_AVX512
static void quant_x(const float *x, int K, int blk, int bits, int8_t *xq, float *xs, float *xc) {
    const int nb = (K + blk - 1) / blk;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * blk;
        int8_t *q = xq + (size_t)b * blk;
        if ((b + 1) * blk > K) {
            quant_block_scalar(xb, K - b * blk, blk, bits, q, xs + b, xc + b);
            continue;
        }
        __m512 mx = _mm512_setzero_ps();
        for (int i = 0; i < blk; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
        const float amax = _mm512_reduce_max_ps(mx);
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m512i sum = _mm512_setzero_si512();
        if (bits == 4) {
            for (int i = 0; i < blk; i += 32) {
                __m512 a = _mm512_loadu_ps(xb + i), c = _mm512_loadu_ps(xb + i + 16);
                __m512i qe = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, even, c), inv));
                __m512i qo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, odd, c), inv));
                _mm_storeu_si128((__m128i *)(q + i / 2), _mm512_cvtsepi32_epi8(qe));
                _mm_storeu_si128((__m128i *)(q + blk / 2 + i / 2), _mm512_cvtsepi32_epi8(qo));
                sum = _mm512_add_epi32(sum, _mm512_add_epi32(qe, qo));
            }
        } else {
            for (int i = 0; i < blk; i += 16) {
                __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + i), inv));
                _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtsepi32_epi8(qi));
                sum = _mm512_add_epi32(sum, qi);
            }
        }
        xs[b] = amax / 127.f;
        xc[b] = xs[b] * (float)_mm512_reduce_add_epi32(sum);
    }
}
#elif EVLM_AVX2
static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline float hsum8(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline int hsum8i(__m256i v) {
    __m128i m = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_add_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_add_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(m);
}

/* 8 int32 -> 8 int8 (saturating, like _mm512_cvtsepi32_epi8) at q */
static inline void store8_epi8(int8_t *q, __m256i v) {
    __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(v, v), _MM_SHUFFLE(3, 1, 2, 0));
    __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_castsi256_si128(w));
    _mm_storel_epi64((__m128i *)q, b);
}

static void quant_x(const float *x, int K, int blk, int bits, int8_t *xq, float *xs, float *xc) {
    const int nb = (K + blk - 1) / blk;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * blk;
        int8_t *q = xq + (size_t)b * blk;
        if ((b + 1) * blk > K) {
            quant_block_scalar(xb, K - b * blk, blk, bits, q, xs + b, xc + b);
            continue;
        }
        __m256 mx = _mm256_setzero_ps();
        for (int i = 0; i < blk; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xb + i), absmask));
        const float amax = hmax8(mx);
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m256i sum = _mm256_setzero_si256();
        if (bits == 4) {
            for (int i = 0; i < blk; i += 16) {
                __m256 a = _mm256_loadu_ps(xb + i), c = _mm256_loadu_ps(xb + i + 8);
                /* [a0 a2 c0 c2 | a4 a6 c4 c6] -> [a0 a2 a4 a6 c0 c2 c4 c6] */
                __m256 e = _mm256_castpd_ps(_mm256_permute4x64_pd(
                    _mm256_castps_pd(_mm256_shuffle_ps(a, c, _MM_SHUFFLE(2, 0, 2, 0))), _MM_SHUFFLE(3, 1, 2, 0)));
                __m256 o = _mm256_castpd_ps(_mm256_permute4x64_pd(
                    _mm256_castps_pd(_mm256_shuffle_ps(a, c, _MM_SHUFFLE(3, 1, 3, 1))), _MM_SHUFFLE(3, 1, 2, 0)));
                __m256i qe = _mm256_cvtps_epi32(_mm256_mul_ps(e, inv));
                __m256i qo = _mm256_cvtps_epi32(_mm256_mul_ps(o, inv));
                store8_epi8(q + i / 2, qe);
                store8_epi8(q + blk / 2 + i / 2, qo);
                sum = _mm256_add_epi32(sum, _mm256_add_epi32(qe, qo));
            }
        } else {
            for (int i = 0; i < blk; i += 8) {
                __m256i qi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), inv));
                store8_epi8(q + i, qi);
                sum = _mm256_add_epi32(sum, qi);
            }
        }
        xs[b] = amax / 127.f;
        xc[b] = xs[b] * (float)hsum8i(sum);
    }
}
#elif EVLM_NEON
/* NEON: vld2q splits a block's even and odd elements (the 4-bit layout), vcvtnq rounds to nearest even like lrintf,
 * vqmovn saturates like _mm512_cvtsepi32_epi8. */
static inline int8x8_t narrow8(int32x4_t a, int32x4_t b) {
    return vqmovn_s16(vcombine_s16(vqmovn_s32(a), vqmovn_s32(b)));
}

static void quant_x(const float *x, int K, int blk, int bits, int8_t *xq, float *xs, float *xc) {
    const int nb = (K + blk - 1) / blk;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * blk;
        int8_t *q = xq + (size_t)b * blk;
        if ((b + 1) * blk > K) {
            quant_block_scalar(xb, K - b * blk, blk, bits, q, xs + b, xc + b);
            continue;
        }
        float32x4_t mx = vdupq_n_f32(0.f);
        for (int i = 0; i < blk; i += 4) mx = vmaxq_f32(mx, vabsq_f32(vld1q_f32(xb + i)));
        const float amax = vmaxvq_f32(mx);
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int32x4_t sum = vdupq_n_s32(0);
        if (bits == 4) {
            for (int i = 0; i < blk; i += 16) {
                float32x4x2_t a = vld2q_f32(xb + i), c = vld2q_f32(xb + i + 8);     /* [even, odd] of 8 each */
                int32x4_t e0 = vcvtnq_s32_f32(vmulq_n_f32(a.val[0], inv));
                int32x4_t e1 = vcvtnq_s32_f32(vmulq_n_f32(c.val[0], inv));
                int32x4_t o0 = vcvtnq_s32_f32(vmulq_n_f32(a.val[1], inv));
                int32x4_t o1 = vcvtnq_s32_f32(vmulq_n_f32(c.val[1], inv));
                vst1_s8(q + i / 2, narrow8(e0, e1));
                vst1_s8(q + blk / 2 + i / 2, narrow8(o0, o1));
                sum = vaddq_s32(sum, vaddq_s32(vaddq_s32(e0, e1), vaddq_s32(o0, o1)));
            }
        } else {
            for (int i = 0; i < blk; i += 8) {
                int32x4_t q0 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + i), inv));
                int32x4_t q1 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + i + 4), inv));
                vst1_s8(q + i, narrow8(q0, q1));
                sum = vaddq_s32(sum, vaddq_s32(q0, q1));
            }
        }
        xs[b] = amax / 127.f;
        xc[b] = xs[b] * (float)vaddvq_s32(sum);
    }
}
#endif

static inline float zero_point(const evlm_linear *w, int n, int b, int nb) {
    if (!w->zp) return w->bits == 4 ? 8.f : 128.f;
    if (w->bits == 8) return (float)w->zp[(size_t)n * nb + b];
    uint8_t z = w->zp[(size_t)n * ((nb + 1) / 2) + b / 2];
    return (float)((b & 1) ? (z >> 4) : (z & 0x0F));
}

/* ---- y[n0:n1] = W[n0:n1] x for one MatMulNBits weight ------------------------------------------------------- */
#if EVLM_AVX512
static void gemv_rows(const evlm_linear *w, const int8_t *xq, const float *xs, const float *xc, float *y, int n0,
                      int n1) {
    const int nb = (w->K + w->blk - 1) / w->blk;
    const int blk = w->blk;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    if (w->bits == 4) {
        const size_t rowbytes = (size_t)nb * blk / 2;
        const int chunks = blk / 128;
        for (int n = n0; n < n1; n++) {
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
        for (int n = n0; n < n1; n++) {
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
#elif EVLM_AVX2
/* AVX2: vpmaddubsw (u8 x s8, pairs summed into a saturating int16) + vpmaddwd by ones (-> int32). 4-bit: the
 * nibbles are 0..15, |x_q| <= 127, a pair is at most 3810 (and two pairs 7620): exact. 8-bit: w - 128 is taken as
 * s8 and multiplied as |w - 128| (u8, <= 128) by sign(w - 128) * x_q (|.| <= 127): a pair is at most 32512 < 32767,
 * exact. The dropped 128 * sum(x_q) enters the zero-point term: (zp - 128) instead of zp. */
static void gemv_rows(const evlm_linear *w, const int8_t *xq, const float *xs, const float *xc, float *y, int n0,
                      int n1) {
    const int nb = (w->K + w->blk - 1) / w->blk;
    const int blk = w->blk;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), bias = _mm256_set1_epi8((char)0x80);
    if (w->bits == 4) {
        const size_t rowbytes = (size_t)nb * blk / 2;
        const int chunks = blk / 128;
        for (int n = n0; n < n1; n++) {
            const uint8_t *row = w->B + (size_t)n * rowbytes;
            const float *sw = w->scales + (size_t)n * nb;
            __m256 acc = _mm256_setzero_ps();
            float corr = 0.f;
            for (int b = 0; b < nb; b++) {
                const int8_t *q = xq + (size_t)b * blk;
                __m256i ai = _mm256_setzero_si256();
                for (int c = 0; c < chunks; c++) {
                    const uint8_t *p = row + (size_t)b * (blk / 2) + c * 64;
                    const int8_t *ql = q + c * 64, *qh = q + blk / 2 + c * 64;
                    _mm_prefetch((const char *)p + EVLM_PREFETCH, _MM_HINT_T0);
                    __m256i v0 = _mm256_loadu_si256((const __m256i *)p);
                    __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + 32));
                    __m256i s0 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(_mm256_and_si256(v0, m4), _mm256_loadu_si256((const __m256i *)ql)),
                        _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), m4),
                                             _mm256_loadu_si256((const __m256i *)qh)));
                    __m256i s1 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(_mm256_and_si256(v1, m4),
                                             _mm256_loadu_si256((const __m256i *)(ql + 32))),
                        _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), m4),
                                             _mm256_loadu_si256((const __m256i *)(qh + 32))));
                    ai = _mm256_add_epi32(ai, _mm256_madd_epi16(s0, ones));
                    ai = _mm256_add_epi32(ai, _mm256_madd_epi16(s1, ones));
                }
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), _mm256_set1_ps(sw[b] * xs[b]), acc);
                corr += sw[b] * xc[b] * zero_point(w, n, b, nb);
            }
            y[n] = hsum8(acc) - corr;
        }
    } else {
        const size_t rowbytes = (size_t)nb * blk;
        const int chunks = blk / 64;
        for (int n = n0; n < n1; n++) {
            const uint8_t *row = w->B + (size_t)n * rowbytes;
            const float *sw = w->scales + (size_t)n * nb;
            __m256 acc = _mm256_setzero_ps();
            float corr = 0.f;
            for (int b = 0; b < nb; b++) {
                const int8_t *q = xq + (size_t)b * blk;
                __m256i ai = _mm256_setzero_si256();
                for (int c = 0; c < chunks; c++) {
                    const uint8_t *p = row + (size_t)b * blk + c * 64;
                    _mm_prefetch((const char *)p + EVLM_PREFETCH, _MM_HINT_T0);
                    __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), bias);   /* w - 128 */
                    __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 32)), bias);
                    __m256i x0 = _mm256_loadu_si256((const __m256i *)(q + c * 64));
                    __m256i x1 = _mm256_loadu_si256((const __m256i *)(q + c * 64 + 32));
                    ai = _mm256_add_epi32(ai, _mm256_madd_epi16(
                        _mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(x0, w0)), ones));
                    ai = _mm256_add_epi32(ai, _mm256_madd_epi16(
                        _mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(x1, w1)), ones));
                }
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), _mm256_set1_ps(sw[b] * xs[b]), acc);
                corr += sw[b] * xc[b] * (zero_point(w, n, b, nb) - 128.f);
            }
            y[n] = hsum8(acc) - corr;
        }
    }
}
#elif EVLM_NEON
/* NEON + dot product: sdot (vdotq_s32) adds four s8 x s8 products into each int32 lane, exactly. 4-bit: the nibbles
 * 0..15 are non-negative signed bytes. 8-bit: w - 128 (the top bit flipped) is a signed byte, and the dropped
 * 128 * sum(x_q) enters the zero-point term as on the AVX2 path: (zp - 128) instead of zp. */
static void gemv_rows(const evlm_linear *w, const int8_t *xq, const float *xs, const float *xc, float *y, int n0,
                      int n1) {
    const int nb = (w->K + w->blk - 1) / w->blk;
    const int blk = w->blk;
    const uint8x16_t m4 = vdupq_n_u8(0x0F), bias = vdupq_n_u8(0x80);
    if (w->bits == 4) {
        const size_t rowbytes = (size_t)nb * blk / 2;
        const int chunks = blk / 128;
        for (int n = n0; n < n1; n++) {
            const uint8_t *row = w->B + (size_t)n * rowbytes;
            const float *sw = w->scales + (size_t)n * nb;
            float32x4_t acc = vdupq_n_f32(0.f);
            float corr = 0.f;
            for (int b = 0; b < nb; b++) {
                const int8_t *q = xq + (size_t)b * blk;
                int32x4_t lo = vdupq_n_s32(0), hi = vdupq_n_s32(0);
                for (int c = 0; c < chunks; c++) {
                    const uint8_t *p = row + (size_t)b * (blk / 2) + c * 64;
                    const int8_t *ql = q + c * 64, *qh = q + blk / 2 + c * 64;
                    __builtin_prefetch(p + EVLM_PREFETCH, 0, 3);
                    for (int j = 0; j < 64; j += 16) {
                        const uint8x16_t v = vld1q_u8(p + j);
                        lo = vdotq_s32(lo, vreinterpretq_s8_u8(vandq_u8(v, m4)), vld1q_s8(ql + j));
                        hi = vdotq_s32(hi, vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vld1q_s8(qh + j));
                    }
                }
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(vaddq_s32(lo, hi)), sw[b] * xs[b]);
                corr += sw[b] * xc[b] * zero_point(w, n, b, nb);
            }
            y[n] = vaddvq_f32(acc) - corr;
        }
    } else {
        const size_t rowbytes = (size_t)nb * blk;
        const int chunks = blk / 64;
        for (int n = n0; n < n1; n++) {
            const uint8_t *row = w->B + (size_t)n * rowbytes;
            const float *sw = w->scales + (size_t)n * nb;
            float32x4_t acc = vdupq_n_f32(0.f);
            float corr = 0.f;
            for (int b = 0; b < nb; b++) {
                const int8_t *q = xq + (size_t)b * blk;
                int32x4_t a0 = vdupq_n_s32(0), a1 = vdupq_n_s32(0);
                for (int c = 0; c < chunks; c++) {
                    const uint8_t *p = row + (size_t)b * blk + c * 64;
                    const int8_t *qc = q + c * 64;
                    __builtin_prefetch(p + EVLM_PREFETCH, 0, 3);
                    for (int j = 0; j < 64; j += 32) {
                        a0 = vdotq_s32(a0, vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p + j), bias)), vld1q_s8(qc + j));
                        a1 = vdotq_s32(a1, vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p + j + 16), bias)),
                                       vld1q_s8(qc + j + 16));
                    }
                }
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(vaddq_s32(a0, a1)), sw[b] * xs[b]);
                corr += sw[b] * xc[b] * (zero_point(w, n, b, nb) - 128.f);
            }
            y[n] = vaddvq_f32(acc) - corr;
        }
    }
}
#endif

/* ---- row scheduler ------------------------------------------------------------------------------------------
 * Each thread owns a contiguous run of row chunks and streams it front to back (one sequential stream per thread:
 * what the hardware prefetchers and the software prefetch above want). A thread that finishes early takes chunks
 * from the back of the others' runs, so a thread slowed down by a neighbour (or preempted) no longer holds every
 * other thread at the barrier. A run is one 64-bit word: generation (16 bits) | front (24) | back (24); owner and
 * thieves move it with compare-and-swap. The generation counts gemv calls (every thread makes the same sequence
 * from the same starting count, kept in slot 0's second word between steps), so a run left over from the previous
 * call is recognised and re-initialised by whoever comes first. */
#define EVLM_CHUNK_BYTES 16384

static inline uint64_t run_pack(uint64_t gen, uint64_t front, uint64_t back) {
    return (gen & 0xFFFF) << 48 | (front & 0xFFFFFF) << 24 | (back & 0xFFFFFF);
}

static inline uint64_t *run_slot(uint64_t *ranges, int t) {      /* 64-byte aligned, 128 bytes apart */
    uintptr_t base = ((uintptr_t)ranges + 63) & ~(uintptr_t)63;
    return (uint64_t *)(base + (size_t)t * 128);
}

/* the current-generation state of thread v's run (installing it if it is still the previous call's) */
static uint64_t run_get(uint64_t *slot, uint64_t gen, int v, int T, int nchunks) {
    uint64_t s = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    while ((s >> 48) != (gen & 0xFFFF)) {
        uint64_t fresh = run_pack(gen, (uint64_t)nchunks * v / T, (uint64_t)nchunks * (v + 1) / T);
        if (__atomic_compare_exchange_n(slot, &s, fresh, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return fresh;
    }
    return s;
}

/* Called by every thread of the parallel region; ends with a barrier (y complete). gen: this call's number. */
static void gemv(const evlm_linear *w, const int8_t *xq, const float *xs, const float *xc, float *y,
                 uint64_t *ranges, uint64_t gen) {
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    const int nb = (w->K + w->blk - 1) / w->blk;
    const size_t rowbytes = (size_t)nb * w->blk * w->bits / 8;
    int rows = (int)(EVLM_CHUNK_BYTES / rowbytes);
    rows = rows < 1 ? 1 : rows;
    const int nchunks = (w->N + rows - 1) / rows;
    for (int k = 0; k < T; k++) {
        const int v = (t + k) % T;                       /* own run first (front to back), then the others' */
        uint64_t *slot = run_slot(ranges, v);
        uint64_t s = run_get(slot, gen, v, T, nchunks);
        for (;;) {
            const uint64_t front = (s >> 24) & 0xFFFFFF, back = s & 0xFFFFFF;
            if (front >= back) break;
            const uint64_t c = k == 0 ? front : back - 1;
            const uint64_t next = k == 0 ? run_pack(gen, front + 1, back) : run_pack(gen, front, back - 1);
            if (!__atomic_compare_exchange_n(slot, &s, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
            const int n0 = (int)c * rows, n1 = n0 + rows < w->N ? n0 + rows : w->N;
            gemv_rows(w, xq, xs, xc, y, n0, n1);
            s = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
        }
    }
#pragma omp barrier
}

#if EVLM_AVX512
/* ---- small fp32 pieces (AVX-512) ----------------------------------------------------------------------------- */
/* e^x for |x| < 88: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the degree-7 Taylor polynomial (rel. err.
 * < 2e-7) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    __m512 ss = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) ss = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), ss);
    float s = _mm512_reduce_add_ps(ss);
    for (; i < n; i++) s += x[i] * x[i];
    const float r = 1.f / sqrtf(s / n + eps);
    for (i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static void rope(float *v, const float *c, const float *s, int half) {
    for (int i = 0; i < half; i++) {
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i] + x1 * s[i];
    }
}

/* 16 KV values from row data at element i: fp32, or fp16 widened */
static inline __m512 kv_load(const void *row, int i, int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i)))
               : _mm512_loadu_ps((const float *)row + i);
}

static inline float dot16(const float *a, const void *b, int n, int f16) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), kv_load(b, i, f16), acc);
    return _mm512_reduce_add_ps(acc);
}

static inline void axpy16(float a, const void *x, float *y, int n, int f16) {
    __m512 va = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, kv_load(x, i, f16),
                                                                            _mm512_loadu_ps(y + i)));
}

static void to_fp16(const float *x, uint16_t *out, int n) {            /* n % 16 == 0 */
    for (int i = 0; i < n; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

/* softmax(q K[0:T]^T * scale) V[0:T] for one head -> out[hd]; sc: [T] scratch; K, V: fp32 rows, or fp16 (f16) */
static void attend(const float *q, const void *K, const void *V, int f16, int T, int hd, float scale, float *sc,
                   float *out) {
    const size_t row = (size_t)hd * (f16 ? 2 : 4);
    float mx = -INFINITY;
    for (int t = 0; t < T; t++) {
        sc[t] = dot16(q, (const char *)K + t * row, hd, f16) * scale;
        mx = sc[t] > mx ? sc[t] : mx;
    }
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    int t = 0;
    for (; t + 16 <= T; t += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + t), vmx));
        _mm512_storeu_ps(sc + t, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    float sum = _mm512_reduce_add_ps(vsum);
    for (; t < T; t++) {
        sc[t] = expf(sc[t] - mx);
        sum += sc[t];
    }
    memset(out, 0, sizeof(float) * hd);
    const float inv = 1.f / sum;
    if (f16)
        for (t = 0; t < T; t++) axpy16(sc[t] * inv, (const char *)V + t * row, out, hd, 1);
    else
        for (t = 0; t < T; t++) axpy16(sc[t] * inv, (const char *)V + t * row, out, hd, 0);
}
#elif EVLM_AVX2
/* ---- small fp32 pieces (AVX2 + FMA + F16C): the same arithmetic, 8 lanes ---------------------------------- */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.f / 5040.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    /* 2^n for n in [-127, 127] from the exponent field (n = -127 gives 0 where scalef gives a denormal) */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    __m256 ss = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) ss = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), ss);
    float s = hsum8(ss);
    for (; i < n; i++) s += x[i] * x[i];
    const float r = 1.f / sqrtf(s / n + eps);
    for (i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static void rope(float *v, const float *c, const float *s, int half) {
    for (int i = 0; i < half; i++) {
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i] + x1 * s[i];
    }
}

static inline __m256 kv_load(const void *row, int i, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
               : _mm256_loadu_ps((const float *)row + i);
}

static inline float dot16(const float *a, const void *b, int n, int f16) {      /* n % 16 == 0 */
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), kv_load(b, i, f16), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), kv_load(b, i + 8, f16), acc1);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

static inline void axpy16(float a, const void *x, float *y, int n, int f16) {
    __m256 va = _mm256_set1_ps(a);
    for (int i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, kv_load(x, i, f16),
                                                                            _mm256_loadu_ps(y + i)));
}

static void to_fp16(const float *x, uint16_t *out, int n) {            /* n % 8 == 0 */
    for (int i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

static void attend(const float *q, const void *K, const void *V, int f16, int T, int hd, float scale, float *sc,
                   float *out) {
    const size_t row = (size_t)hd * (f16 ? 2 : 4);
    float mx = -INFINITY;
    for (int t = 0; t < T; t++) {
        sc[t] = dot16(q, (const char *)K + t * row, hd, f16) * scale;
        mx = sc[t] > mx ? sc[t] : mx;
    }
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= T; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + t), vmx));
        _mm256_storeu_ps(sc + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum8(vsum);
    for (; t < T; t++) {
        sc[t] = expf(sc[t] - mx);
        sum += sc[t];
    }
    memset(out, 0, sizeof(float) * hd);
    const float inv = 1.f / sum;
    if (f16)
        for (t = 0; t < T; t++) axpy16(sc[t] * inv, (const char *)V + t * row, out, hd, 1);
    else
        for (t = 0; t < T; t++) axpy16(sc[t] * inv, (const char *)V + t * row, out, hd, 0);
}
#elif EVLM_NEON
/* ---- small fp32 pieces (NEON): the same arithmetic, 4 lanes; fp16 <-> fp32 with fcvtl / fcvtn (round to nearest
 * even, like F16C and numpy) ------------------------------------------------------------------------------------ */
static inline float32x4_t exp4(float32x4_t x) {
    x = vmaxq_f32(vminq_f32(x, vdupq_n_f32(88.f)), vdupq_n_f32(-88.f));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_n_f32(x, n, 0.693145751953125f);                    /* x - n ln2 (two parts) */
    r = vfmsq_n_f32(r, n, 1.428606765330187e-06f);
    float32x4_t p = vdupq_n_f32(1.f / 5040.f);
    p = vfmaq_f32(vdupq_n_f32(1.f / 720.f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.f / 120.f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.f / 24.f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.f / 6.f), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.f), p, r);
    /* 2^n for n in [-127, 127] from the exponent field (n = -127 gives 0, as on the AVX2 path) */
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out) {
    float32x4_t ss = vdupq_n_f32(0.f);
    int i = 0;
    for (; i + 4 <= n; i += 4) ss = vfmaq_f32(ss, vld1q_f32(x + i), vld1q_f32(x + i));
    float s = vaddvq_f32(ss);
    for (; i < n; i++) s += x[i] * x[i];
    const float r = 1.f / sqrtf(s / n + eps);
    for (i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static void rope(float *v, const float *c, const float *s, int half) {
    for (int i = 0; i < half; i++) {
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i] + x1 * s[i];
    }
}

static inline float32x4_t kv_load(const void *row, int i, int f16) {
    return f16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)row + i)))
               : vld1q_f32((const float *)row + i);
}

static inline float dot16(const float *a, const void *b, int n, int f16) {      /* n % 16 == 0 */
    float32x4_t a0 = vdupq_n_f32(0.f), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < n; i += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(a + i), kv_load(b, i, f16));
        a1 = vfmaq_f32(a1, vld1q_f32(a + i + 4), kv_load(b, i + 4, f16));
        a2 = vfmaq_f32(a2, vld1q_f32(a + i + 8), kv_load(b, i + 8, f16));
        a3 = vfmaq_f32(a3, vld1q_f32(a + i + 12), kv_load(b, i + 12, f16));
    }
    return vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
}

static inline void axpy16(float a, const void *x, float *y, int n, int f16) {
    for (int i = 0; i < n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), kv_load(x, i, f16), a));
}

static void to_fp16(const float *x, uint16_t *out, int n) {            /* n % 4 == 0 */
    for (int i = 0; i < n; i += 4) vst1_u16(out + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
}

static void attend(const float *q, const void *K, const void *V, int f16, int T, int hd, float scale, float *sc,
                   float *out) {
    const size_t row = (size_t)hd * (f16 ? 2 : 4);
    float mx = -INFINITY;
    for (int t = 0; t < T; t++) {
        sc[t] = dot16(q, (const char *)K + t * row, hd, f16) * scale;
        mx = sc[t] > mx ? sc[t] : mx;
    }
    const float32x4_t vmx = vdupq_n_f32(mx);
    float32x4_t vsum = vdupq_n_f32(0.f);
    int t = 0;
    for (; t + 4 <= T; t += 4) {
        float32x4_t e = exp4(vsubq_f32(vld1q_f32(sc + t), vmx));
        vst1q_f32(sc + t, e);
        vsum = vaddq_f32(vsum, e);
    }
    float sum = vaddvq_f32(vsum);
    for (; t < T; t++) {
        sc[t] = expf(sc[t] - mx);
        sum += sc[t];
    }
    memset(out, 0, sizeof(float) * hd);
    const float inv = 1.f / sum;
    if (f16)
        for (t = 0; t < T; t++) axpy16(sc[t] * inv, (const char *)V + t * row, out, hd, 1);
    else
        for (t = 0; t < T; t++) axpy16(sc[t] * inv, (const char *)V + t * row, out, hd, 0);
}
#endif

/* One decode step. x: the new token's embedding [hidden]; pos: tokens already in the KV cache (the new token's
 * position); logits: [vocab]. Returns 0, or -1 when pos is outside the KV buffer / rotary table.
 *
 * Every thread keeps its own copy of the residual stream (h), normalizes and quantizes it itself: identical
 * arithmetic on identical inputs, so the copies agree, and the only barriers left are the ones where a thread
 * needs the others' output (after each matmul, after attention and after the SiLU). */
int evlm_decode_step(const evlm_model *m, const float *x, int pos, float *logits) {
    if (pos < 0 || pos >= m->max_len || pos >= m->max_pos) return -1;
    const int D = m->hidden, hd = m->head_dim, H = m->num_heads, KVH = m->kv_heads, T = pos + 1, I = m->inter;
    const int group = H / KVH;
    uint64_t *gen_store = run_slot(m->ranges, 0) + 1;
    const uint64_t gen0 = *gen_store;
#pragma omp parallel num_threads(m->threads)
    {
        const int t = omp_get_thread_num();
        uint64_t gen = gen0;                                /* gemv calls so far, the same on every thread */
        float *h = m->h + (size_t)t * D, *xn = m->xn + (size_t)t * D;
        int8_t *xq = m->xq + (size_t)t * m->xq_stride;
        float *xs = m->xs + (size_t)t * m->xs_stride, *xc = m->xc + (size_t)t * m->xs_stride;
        memcpy(h, x, sizeof(float) * (size_t)D);
        for (int l = 0; l < m->num_layers; l++) {
            const evlm_layer *L = &m->layers[l];
            /* attention block: qkv = Wqkv rmsnorm(h) */
            rmsnorm(h, L->ln1, D, m->eps, xn);
            quant_x(xn, D, L->qkv.blk, L->qkv.bits, xq, xs, xc);
            gemv(&L->qkv, xq, xs, xc, m->qkv, m->ranges, ++gen);
            /* per KV head: rotary on k, append k / v at row pos; then rotary on q and attention for its group */
#pragma omp for schedule(static)
            for (int g = 0; g < KVH; g++) {
                const float *c = m->cos_cache + (size_t)pos * m->rot_half;
                const float *s = m->sin_cache + (size_t)pos * m->rot_half;
                float *k = m->qkv + (size_t)(H + g) * hd;
                rope(k, c, s, m->rot_half);
                const float *v = m->qkv + (size_t)(H + KVH + g) * hd;
                const size_t off = (size_t)g * m->max_len * hd;
                memcpy(L->k_cache + off + (size_t)pos * hd, k, sizeof(float) * hd);
                memcpy(L->v_cache + off + (size_t)pos * hd, v, sizeof(float) * hd);
                const int f16 = L->k16 != NULL;
                const void *K = L->k_cache + off, *V = L->v_cache + off;
                if (f16) {
                    to_fp16(k, L->k16 + off + (size_t)pos * hd, hd);
                    to_fp16(v, L->v16 + off + (size_t)pos * hd, hd);
                    K = L->k16 + off;
                    V = L->v16 + off;
                }
                for (int hh = g * group; hh < (g + 1) * group; hh++) {
                    float *q = m->qkv + (size_t)hh * hd;
                    rope(q, c, s, m->rot_half);
                    attend(q, K, V, f16, T, hd, m->scale, m->scores + (size_t)hh * m->max_len,
                           m->attn + (size_t)hh * hd);
                }
            }
            quant_x(m->attn, H * hd, L->o.blk, L->o.bits, xq, xs, xc);
            gemv(&L->o, xq, xs, xc, m->y, m->ranges, ++gen);
            /* residual, MLP block */
            for (int i = 0; i < D; i++) h[i] += m->y[i];
            rmsnorm(h, L->ln2, D, m->eps, xn);
            quant_x(xn, D, L->gate_up.blk, L->gate_up.bits, xq, xs, xc);
            gemv(&L->gate_up, xq, xs, xc, m->gu, m->ranges, ++gen);
            if (L->up.B) gemv(&L->up, xq, xs, xc, m->gu + I, m->ranges, ++gen);  /* same input and quantization */
#pragma omp for schedule(static)
            for (int i = 0; i < I; i += 16) {                /* act = silu(gate) * up */
                if (i + 16 <= I) {
#if EVLM_AVX512
                    __m512 g = _mm512_loadu_ps(m->gu + i);
                    __m512 sg = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(
                        _mm512_setzero_ps(), g))));
                    _mm512_storeu_ps(m->act + i, _mm512_mul_ps(sg, _mm512_loadu_ps(m->gu + I + i)));
#elif EVLM_AVX2
                    for (int j = i; j < i + 16; j += 8) {
                        __m256 g = _mm256_loadu_ps(m->gu + j);
                        __m256 sg = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(
                            _mm256_setzero_ps(), g))));
                        _mm256_storeu_ps(m->act + j, _mm256_mul_ps(sg, _mm256_loadu_ps(m->gu + I + j)));
                    }
#elif EVLM_NEON
                    for (int j = i; j < i + 16; j += 4) {
                        float32x4_t g = vld1q_f32(m->gu + j);
                        float32x4_t sg = vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.f), exp4(vnegq_f32(g))));
                        vst1q_f32(m->act + j, vmulq_f32(sg, vld1q_f32(m->gu + I + j)));
                    }
#endif
                } else {
                    for (int j = i; j < I; j++) m->act[j] = m->gu[j] / (1.f + expf(-m->gu[j])) * m->gu[I + j];
                }
            }
            quant_x(m->act, I, L->down.blk, L->down.bits, xq, xs, xc);
            gemv(&L->down, xq, xs, xc, m->y, m->ranges, ++gen);
            for (int i = 0; i < D; i++) h[i] += m->y[i];
        }
        rmsnorm(h, m->ln_final, D, m->eps, xn);
        quant_x(xn, D, m->head.blk, m->head.bits, xq, xs, xc);
        gemv(&m->head, xq, xs, xc, logits, m->ranges, ++gen);
#pragma omp master
        *gen_store = gen;
    }
    return 0;
}

/* Rows [start, end) of every layer's fp32 cache -> its fp16 copy (after a prefill filled them). */
void evlm_kv_sync(const evlm_model *m, int start, int end) {
    const int hd = m->head_dim, n = m->num_layers * m->kv_heads;
    if (start < 0 || end > m->max_len || start >= end) return;
#pragma omp parallel for num_threads(m->threads) schedule(static)
    for (int i = 0; i < n; i++) {
        const evlm_layer *L = &m->layers[i / m->kv_heads];
        if (!L->k16) continue;
        const size_t off = ((size_t)(i % m->kv_heads) * m->max_len + start) * hd;
        to_fp16(L->k_cache + off, L->k16 + off, (end - start) * hd);
        to_fp16(L->v_cache + off, L->v16 + off, (end - start) * hd);
    }
}

/* The block quantization alone (for tests of the Python-side reference). */
void evlm_quant_x(const float *x, int K, int blk, int bits, int8_t *xq, float *xs, float *xc) {
    quant_x(x, K, blk, bits, xq, xs, xc);
}

/* One matrix-vector product (for tests and the kernel benchmark). */
void evlm_gemv(const evlm_linear *w, const float *x, float *y, int8_t *xq, float *xs, float *xc, int threads) {
    uint64_t ranges[16 * 17] = {0};                        /* 16 threads at most here, one 128-byte slot each */
    quant_x(x, w->K, w->blk, w->bits, xq, xs, xc);
    threads = threads < 1 ? 1 : threads > 16 ? 16 : threads;
#pragma omp parallel num_threads(threads)
    gemv(w, xq, xs, xc, y, ranges, 1);
}

/* Read n bytes (n % 64 == 0, p 64-byte aligned), each thread one contiguous slice: the read-bandwidth reference
 * of benchmarks/native_kernel_bench.py. Returns a checksum so that the loads stay. */
uint64_t evlm_read_stream(const uint8_t *p, size_t n, int threads) {
    uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        const size_t T = (size_t)omp_get_num_threads(), t = (size_t)omp_get_thread_num(), lines = n / 64;
        const size_t lo = lines * t / T * 64, hi = lines * (t + 1) / T * 64;
#if EVLM_AVX512
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        size_t i = lo;
        for (; i + 256 <= hi; i += 256) {
            a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
            a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 64));
            a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 128));
            a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 192));
        }
        for (; i < hi; i += 64) a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
        total += (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
#elif EVLM_AVX2
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        size_t i = lo;
        for (; i + 128 <= hi; i += 128) {
            a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
            a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
            a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
            a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
        }
        for (; i < hi; i += 32) a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
        __m256i s4 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
        __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
        total += (uint64_t)_mm_cvtsi128_si64(s2) + (uint64_t)_mm_extract_epi64(s2, 1);
#elif EVLM_NEON
        uint64x2_t a0 = vdupq_n_u64(0), a1 = a0, a2 = a0, a3 = a0;
        size_t i = lo;
        for (; i + 64 <= hi; i += 64) {
            a0 = vaddq_u64(a0, vld1q_u64((const uint64_t *)(p + i)));
            a1 = vaddq_u64(a1, vld1q_u64((const uint64_t *)(p + i + 16)));
            a2 = vaddq_u64(a2, vld1q_u64((const uint64_t *)(p + i + 32)));
            a3 = vaddq_u64(a3, vld1q_u64((const uint64_t *)(p + i + 48)));
        }
        total += vaddvq_u64(vaddq_u64(vaddq_u64(a0, a1), vaddq_u64(a2, a3)));
#endif
    }
    return total;
}

/* 4: the structs of 3, plus evlm_source_sha and ISA code 3 */
int evlm_abi_version(void) { return 4; }

/* The compiled code path: 1 = AVX-512 VNNI, 2 = AVX2 + FMA + F16C, 3 = ARM64 NEON + dot product (see EVLM_ISA). */
int evlm_isa(void) { return EVLM_ISA; }

/* The sha256 prefix of the source this library was compiled from (EVLM_SOURCE_SHA). */
const char *evlm_source_sha(void) { return EVLM_SOURCE_SHA; }
