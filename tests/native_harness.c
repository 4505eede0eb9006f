/* Test harness for the native decode kernel without Python: compiled together with decode.c (it #includes it) for
 * this machine, or cross-compiled for ARM64 and run under qemu-aarch64, by tests/test_native_arm.py.
 *
 * It is fed what the ctypes engine (edgevlm/runtime/native/engine.py) would give the kernel, as files that
 * tests/native_harness.py writes: a spec (whitespace-separated text: the model's dims, and every tensor as a
 * (file, byte offset) pair into the listed files: the bundle's decoder.onnx.data at the plan's offsets, and an extra
 * file with the inline tensors, the KV state after ONNX Runtime's prefill and the fp32 embedding table).
 *
 *   native_harness SPEC OUT
 *
 * mode gemv: one evlm_gemv per case (random MatMulNBits weights), OUT = every case's y (float32), concatenated.
 * mode decode: greedy decoding from the prefill's KV state and first token: `steps` calls of evlm_decode_step, each
 * fed the embedding row of the previous token, the next token the first maximum of the logits (as the runtime's
 * greedy sampler). OUT = int32 steps, int32 isa, int32 tokens[steps], float32 logits[vocab] (the last step's), the
 * fp32 KV buffers [layers, 2, kv_heads, max_len, head_dim], then (kv16 1) the fp16 copy in the same layout.
 * Prints "isa N" (evlm_isa()) on stdout. Exit 2 on a malformed spec, 3 when the kernel refuses a position.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "decode.c"

#define MAX_FILES 8

static FILE *spec;
static unsigned char *files[MAX_FILES];
static size_t sizes[MAX_FILES];
static int nfiles;

__attribute__((noreturn)) static void fail(const char *what) {
    fprintf(stderr, "native_harness: %s\n", what);
    exit(2);
}

static void expect(const char *label) {
    char word[64];
    if (fscanf(spec, "%63s", word) != 1 || strcmp(word, label) != 0) {
        fprintf(stderr, "native_harness: expected '%s' in the spec\n", label);
        exit(2);
    }
}

static long read_long(void) {
    long v;
    if (fscanf(spec, "%ld", &v) != 1) fail("expected an integer in the spec");
    return v;
}

static float read_float(void) {
    float v;
    if (fscanf(spec, "%f", &v) != 1) fail("expected a number in the spec");
    return v;
}

/* "F OFFSET" -> a pointer into file F (F = -1: NULL); need: bytes that must fit */
static void *read_ref(size_t need) {
    long f = read_long(), off = read_long();
    if (f < 0) return NULL;
    if (f >= nfiles || off < 0 || (size_t)off + need > sizes[f]) fail("a tensor reference is outside its file");
    return files[f] + off;
}

static void *read_tensor(const char *label, size_t need) {
    expect(label);
    return read_ref(need);
}

/* "linear Bf Bo Sf So Zf Zo N K blk bits" */
static void read_linear(evlm_linear *w) {
    expect("linear");
    long refs[6];
    for (int i = 0; i < 6; i++) refs[i] = read_long();
    w->N = (int)read_long();
    w->K = (int)read_long();
    w->blk = (int)read_long();
    w->bits = (int)read_long();
    const size_t nb = (size_t)(w->K + w->blk - 1) / w->blk;
    const size_t need[3] = {(size_t)w->N * nb * w->blk * w->bits / 8, (size_t)w->N * nb * 4,
                            (size_t)w->N * (w->bits == 4 ? (nb + 1) / 2 : nb)};
    const void *ptr[3];
    for (int i = 0; i < 3; i++) {
        const long f = refs[2 * i], off = refs[2 * i + 1];
        if (f < 0) {
            ptr[i] = NULL;
            continue;
        }
        if (f >= nfiles || off < 0 || (size_t)off + need[i] > sizes[f]) fail("a weight is outside its file");
        ptr[i] = files[f] + off;
    }
    if (!ptr[0] || !ptr[1]) fail("a linear needs its weight and scales");
    w->B = ptr[0];
    w->scales = ptr[1];
    w->zp = ptr[2];
}

static void map_files(void) {
    expect("files");
    nfiles = (int)read_long();
    if (nfiles < 1 || nfiles > MAX_FILES) fail("1 to 8 files");
    for (int i = 0; i < nfiles; i++) {
        char path[4096];
        if (fscanf(spec, "%4095s", path) != 1) fail("expected a file path");
        const int fd = open(path, O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0 || st.st_size == 0) fail("cannot open a listed file (or it is empty)");
        sizes[i] = (size_t)st.st_size;
        /* private and writable: the KV state is written in place; the weights are only read */
        files[i] = mmap(NULL, sizes[i], PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        close(fd);
        if (files[i] == MAP_FAILED) fail("mmap failed");
    }
}

static void *zalloc(size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) fail("out of memory");
    return p;
}

static void write_out(FILE *out, const void *p, size_t bytes) {
    if (fwrite(p, 1, bytes, out) != bytes) fail("cannot write the output");
}

static int padded_k(const evlm_linear *w) { return (w->K + w->blk - 1) / w->blk * w->blk; }

static int run_gemv(FILE *out, int threads) {
    expect("cases");
    const long cases = read_long();
    for (long c = 0; c < cases; c++) {
        evlm_linear w;
        read_linear(&w);
        const float *x = read_tensor("x", (size_t)w.K * 4);
        const int kp = padded_k(&w), nb = kp / w.blk;
        float *y = zalloc((size_t)w.N * 4), *xs = zalloc((size_t)nb * 4), *xc = zalloc((size_t)nb * 4);
        int8_t *xq = zalloc((size_t)kp);
        evlm_gemv(&w, x, y, xq, xs, xc, threads);
        write_out(out, y, (size_t)w.N * 4);
        free(y), free(xs), free(xc), free(xq);
    }
    return 0;
}

static int run_decode(FILE *out, int threads) {
    evlm_model m;
    memset(&m, 0, sizeof m);
    expect("dims");
    m.num_layers = (int)read_long();
    m.hidden = (int)read_long();
    m.num_heads = (int)read_long();
    m.kv_heads = (int)read_long();
    m.head_dim = (int)read_long();
    m.inter = (int)read_long();
    m.vocab = (int)read_long();
    m.max_len = (int)read_long();
    m.rot_half = (int)read_long();
    m.max_pos = (int)read_long();
    m.threads = threads;
    expect("eps");
    m.eps = read_float();
    expect("scale");
    m.scale = read_float();
    const int L = m.num_layers, D = m.hidden, H = m.num_heads, KVH = m.kv_heads, HD = m.head_dim, I = m.inter;
    m.cos_cache = read_tensor("cos", (size_t)m.max_pos * m.rot_half * 4);
    m.sin_cache = read_tensor("sin", (size_t)m.max_pos * m.rot_half * 4);
    m.ln_final = read_tensor("final_norm", (size_t)D * 4);
    read_linear(&m.head);
    evlm_layer *layers = zalloc(sizeof(evlm_layer) * (size_t)L);
    int max_k = padded_k(&m.head), max_nb = max_k / m.head.blk;
    for (int l = 0; l < L; l++) {
        evlm_layer *y = &layers[l];
        y->ln1 = read_tensor("ln1", (size_t)D * 4);
        y->ln2 = read_tensor("ln2", (size_t)D * 4);
        read_linear(&y->qkv);
        read_linear(&y->o);
        read_linear(&y->gate_up);
        char word[16];
        if (fscanf(spec, "%15s", word) != 1) fail("expected 'up'");
        if (strcmp(word, "up") == 0) read_linear(&y->up);
        else if (strcmp(word, "no_up") != 0) fail("expected 'up' or 'no_up'");
        read_linear(&y->down);
        const evlm_linear *all[5] = {&y->qkv, &y->o, &y->gate_up, &y->up, &y->down};
        for (int j = 0; j < 5; j++) {
            if (!all[j]->B) continue;
            const int k = padded_k(all[j]);
            max_k = k > max_k ? k : max_k;
            max_nb = k / all[j]->blk > max_nb ? k / all[j]->blk : max_nb;
        }
    }
    m.layers = layers;
    const size_t plane = (size_t)KVH * m.max_len * HD;                /* one layer's K (or V) buffer, elements */
    float *kv = read_tensor("kv", (size_t)L * 2 * plane * 4);
    expect("kv16");
    const int kv16 = (int)read_long();
    uint16_t *k16 = kv16 ? zalloc((size_t)L * 2 * plane * 2) : NULL;
    for (int l = 0; l < L; l++) {
        layers[l].k_cache = kv + (size_t)(2 * l) * plane;
        layers[l].v_cache = kv + (size_t)(2 * l + 1) * plane;
        layers[l].k16 = kv16 ? k16 + (size_t)(2 * l) * plane : NULL;
        layers[l].v16 = kv16 ? k16 + (size_t)(2 * l + 1) * plane : NULL;
    }
    expect("prompt");
    const int P = (int)read_long();
    const float *embed = read_tensor("embed", (size_t)m.vocab * D * 4);
    expect("first");
    int tok = (int)read_long();
    expect("steps");
    const int steps = (int)read_long();
    if (P < 1 || P + steps > m.max_len || tok < 0 || tok >= m.vocab) fail("prompt / steps / first token out of range");

    /* scratch, as NativeDecoder allocates it */
    max_k = (max_k + 63) / 64 * 64;
    max_nb = (max_nb + 15) / 16 * 16;
    m.h = zalloc((size_t)threads * D * 4);
    m.xn = zalloc((size_t)threads * D * 4);
    m.qkv = zalloc((size_t)(H + 2 * KVH) * HD * 4);
    m.attn = zalloc((size_t)H * HD * 4);
    m.y = zalloc((size_t)D * 4);
    m.gu = zalloc((size_t)2 * I * 4);
    m.act = zalloc((size_t)I * 4);
    m.scores = zalloc((size_t)H * m.max_len * 4);
    m.xq = zalloc((size_t)threads * max_k);
    m.xs = zalloc((size_t)threads * max_nb * 4);
    m.xc = zalloc((size_t)threads * max_nb * 4);
    m.xq_stride = max_k;
    m.xs_stride = max_nb;
    m.ranges = zalloc(((size_t)16 * threads + 8) * 8);

    if (kv16) evlm_kv_sync(&m, 0, P);                   /* the prefill's rows into the fp16 copy */
    int32_t *tokens = zalloc((size_t)(steps > 0 ? steps : 1) * 4);
    float *logits = zalloc((size_t)m.vocab * 4);
    for (int s = 0; s < steps; s++) {
        if (evlm_decode_step(&m, embed + (size_t)tok * D, P + s, logits) != 0) {
            fprintf(stderr, "native_harness: evlm_decode_step refused position %d\n", P + s);
            return 3;
        }
        int best = 0;
        for (int v = 1; v < m.vocab; v++)
            if (logits[v] > logits[best]) best = v;
        tokens[s] = tok = best;
    }
    const int32_t head[2] = {steps, evlm_isa()};
    write_out(out, head, sizeof head);
    write_out(out, tokens, (size_t)steps * 4);
    write_out(out, logits, (size_t)m.vocab * 4);
    write_out(out, kv, (size_t)L * 2 * plane * 4);
    if (kv16) write_out(out, k16, (size_t)L * 2 * plane * 2);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: native_harness SPEC OUT\n");
        return 2;
    }
    spec = fopen(argv[1], "r");
    if (!spec) fail("cannot open the spec");
    expect("evlm-harness");
    if (read_long() != 1) fail("spec version 1 expected");
    expect("mode");
    char mode[16];
    if (fscanf(spec, "%15s", mode) != 1) fail("expected a mode");
    expect("threads");
    const int threads = (int)read_long();
    if (threads < 1 || threads > 64) fail("1 to 64 threads");
    map_files();
    FILE *out = fopen(argv[2], "wb");
    if (!out) fail("cannot create the output");
    printf("isa %d\n", evlm_isa());
    fflush(stdout);
    int rc;
    if (strcmp(mode, "gemv") == 0) rc = run_gemv(out, threads);
    else if (strcmp(mode, "decode") == 0) rc = run_decode(out, threads);
    else fail("mode is gemv or decode");
    if (fclose(out) != 0) fail("cannot write the output");
    return rc;
}
