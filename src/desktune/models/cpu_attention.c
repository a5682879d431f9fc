/* Causal attention of packed bf16 samples on AVX512-BF16 CPUs: flash-attention tiles of 64 x 64, bf16 products
 * with fp32 accumulation (vdpbf16ps), softmax and its gradient on cache-resident tiles. One unit of work is one
 * (sample, query head); units are shared by the threads. Built by cpu_attention.py at first use.
 *
 * Layouts (element strides in bf16 elements; head_dim 64):
 *   q:  row (t, h) at q + h * q_sh + t * q_st          k, v: row (t, g) at k + g * kv_sh + t * kv_st
 *   o:  [T][H][64] bf16, lse: [H][T] fp32
 *   do: [T][H][64] bf16; dq: [H][T][64] bf16; dk, dv: [H][T][64] fp32 per query head (the caller adds groups).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define D 64
#define B 64

typedef uint16_t bf16;

/* C[M x 64] (+)= A[M x K] . B: A bf16 row-major (pairs along K), B packed as pairs: B[kp * ldb + 2 * n + {0,1}]. */
static void mm64(int M, int K, const bf16 *A, int lda, const bf16 *Bp, int ldb, float *C, int ldc, int acc) {
    for (int r = 0; r < M; r += 4) {
        __m512 c[4][4];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++)
                c[i][j] = acc ? _mm512_loadu_ps(C + (r + i) * ldc + 16 * j) : _mm512_setzero_ps();
        for (int kp = 0; kp < K / 2; kp++) {
            const bf16 *b = Bp + (size_t)kp * ldb;
            __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 32);
            __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 64), b3 = (__m512bh)_mm512_loadu_si512(b + 96);
            for (int i = 0; i < 4; i++) {
                int32_t pair;
                memcpy(&pair, A + (size_t)(r + i) * lda + 2 * kp, 4);
                __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
                c[i][0] = _mm512_dpbf16_ps(c[i][0], a, b0);
                c[i][1] = _mm512_dpbf16_ps(c[i][1], a, b1);
                c[i][2] = _mm512_dpbf16_ps(c[i][2], a, b2);
                c[i][3] = _mm512_dpbf16_ps(c[i][3], a, b3);
            }
        }
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(C + (r + i) * ldc + 16 * j, c[i][j]);
    }
}

/* e^x for x <= 0 (and -inf): 2^(x log2 e) as 2^n times a degree-6 polynomial of the fraction. */
static inline __m512 exp512(__m512 x) {
    __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ); /* exactly 0 below */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

static inline float bf2f(bf16 x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* 16 fp32 -> 16 bf16, round to nearest even. */
static inline void store_bf16(bf16 *dst, __m512 x) { _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(x)); }

/* A head's n rows (row stride st) into [np][64], zero rows after n. */
static void copy_rows(bf16 *dst, const bf16 *src, long st, int n, int np) {
    for (int t = 0; t < n; t++) memcpy(dst + t * D, src + t * st, D * 2);
    memset(dst + (size_t)n * D, 0, (size_t)(np - n) * D * 2);
}

/* rows [np][64] -> pairs along the 64 columns: out[c/2][np][2] (B operand of an (rows x 64) . (64 x rows) product). */
static void pack_cols(bf16 *out, const bf16 *rows, int np) {
    for (int t = 0; t < np; t++)
        for (int c = 0; c < D; c += 2) {
            out[(size_t)(c / 2) * np * 2 + 2 * t] = rows[t * D + c];
            out[(size_t)(c / 2) * np * 2 + 2 * t + 1] = rows[t * D + c + 1];
        }
}

/* rows [np][64] -> pairs along the rows: out[t/2][64][2] (B operand of a (x rows) . (rows x 64) product). */
static void pack_rows(bf16 *out, const bf16 *rows, int np) {
    for (int t = 0; t < np; t += 2)
        for (int c = 0; c < D; c++) {
            out[(size_t)(t / 2) * 2 * D + 2 * c] = rows[t * D + c];
            out[(size_t)(t / 2) * 2 * D + 2 * c + 1] = rows[(t + 1) * D + c];
        }
}

/* The 64 x 64 score tile of query block ib, key block jb: scaled, causal and length masked (-inf). */
static void scores(float *S, const bf16 *Q, const bf16 *Kc, int np, int ib, int jb, int n, float scale) {
    mm64(B, D, Q + (size_t)ib * B * D, D, Kc + 2 * jb * B, 2 * np, S, B, 0);
    __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < B; i++) {
        int lim = ib == jb ? i : B - 1; /* last visible column */
        if (jb * B + lim >= n) lim = n - 1 - jb * B;
        for (int j = 0; j < B; j += 16) {
            __m512 s = _mm512_mul_ps(_mm512_loadu_ps(S + i * B + j), sc);
            int keep = lim - j + 1;
            __mmask16 m = keep >= 16 ? 0xFFFF : (keep <= 0 ? 0 : (__mmask16)((1u << keep) - 1));
            _mm512_storeu_ps(S + i * B + j, _mm512_mask_blend_ps(m, ninf, s));
        }
    }
}

typedef struct {
    int T, H, G, n_seg, threads;
    const int *seg;               /* n_seg + 1 boundaries */
    const bf16 *q, *k, *v;        /* forward inputs */
    long q_sh, q_st, kv_sh, kv_st;
    bf16 *o;                      /* [T][H][64] */
    float *lse;                   /* [H][T] */
    const bf16 *dout;             /* backward: [T][H][64] */
    bf16 *dq;                     /* [H][T][64] */
    float *dk, *dv;               /* [H][T][64] */
    float scale;
    int n_units;
    int *order;                   /* units, longest sample first */
} Job;

typedef struct {
    bf16 *Q, *Kc, *Vr, *dO, *Vc, *Qr, *dOr, *Kr, *Pb, *Pt, *dSb, *dSt;
    float *S, *O, *dP, *dQ, *dK, *dV, *lse, *delta;
} Scratch;

static void alloc_scratch(Scratch *s, int np) {
    size_t rows = (size_t)np * D;
    bf16 **b[] = {&s->Q, &s->Kc, &s->Vr, &s->dO, &s->Vc, &s->Qr, &s->dOr, &s->Kr};
    for (int i = 0; i < 8; i++) *b[i] = aligned_alloc(64, rows * 2);
    bf16 **t[] = {&s->Pb, &s->Pt, &s->dSb, &s->dSt};
    for (int i = 0; i < 4; i++) *t[i] = aligned_alloc(64, B * B * 2);
    s->S = aligned_alloc(64, B * B * 4);
    s->dP = aligned_alloc(64, B * B * 4);
    s->O = aligned_alloc(64, B * D * 4);
    s->dQ = aligned_alloc(64, rows * 4);
    s->dK = aligned_alloc(64, B * D * 4);
    s->dV = aligned_alloc(64, B * D * 4);
    s->lse = aligned_alloc(64, (size_t)np * 4);
    s->delta = aligned_alloc(64, (size_t)np * 4);
}

static void free_scratch(Scratch *s) {
    void *p[] = {s->Q, s->Kc, s->Vr, s->dO, s->Vc, s->Qr, s->dOr, s->Kr, s->Pb, s->Pt, s->dSb, s->dSt,
                 s->S, s->dP, s->O, s->dQ, s->dK, s->dV, s->lse, s->delta};
    for (int i = 0; i < 20; i++) free(p[i]);
}

/* Online softmax of one score tile into P (bf16), updating row maxima m and sums l; returns per-row rescales. */
static void softmax_tile(float *S, bf16 *Pb, float *m, float *l, float *alpha) {
    for (int i = 0; i < B; i++) {
        __m512 mx = _mm512_set1_ps(m[i]);
        for (int j = 0; j < B; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(S + i * B + j));
        float mnew = _mm512_reduce_max_ps(mx);
        alpha[i] = m[i] == -INFINITY ? 0.0f : expf(m[i] - mnew);
        __m512 mv = _mm512_set1_ps(mnew), sum = _mm512_setzero_ps();
        for (int j = 0; j < B; j += 16) {
            __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(S + i * B + j), mv));
            sum = _mm512_add_ps(sum, p);
            store_bf16(Pb + i * B + j, p);
        }
        l[i] = l[i] * alpha[i] + _mm512_reduce_add_ps(sum);
        m[i] = mnew;
    }
}

static void forward_unit(Job *job, Scratch *sc, int seg, int h) {
    int t0 = job->seg[seg], n = job->seg[seg + 1] - t0, np = (n + B - 1) / B * B, g = h / (job->H / job->G);
    copy_rows(sc->Q, job->q + h * job->q_sh + (long)t0 * job->q_st, job->q_st, n, np);
    copy_rows(sc->dO, job->k + g * job->kv_sh + (long)t0 * job->kv_st, job->kv_st, n, np); /* K rows */
    pack_cols(sc->Kc, sc->dO, np);
    copy_rows(sc->dO, job->v + g * job->kv_sh + (long)t0 * job->kv_st, job->kv_st, n, np); /* V rows */
    pack_rows(sc->Vr, sc->dO, np);
    float m[B], l[B], alpha[B];
    for (int ib = 0; ib < np / B; ib++) {
        for (int i = 0; i < B; i++) m[i] = -INFINITY, l[i] = 0.0f;
        memset(sc->O, 0, B * D * 4);
        for (int jb = 0; jb <= ib; jb++) {
            scores(sc->S, sc->Q, sc->Kc, np, ib, jb, n, job->scale);
            softmax_tile(sc->S, sc->Pb, m, l, alpha);
            for (int i = 0; i < B; i++) {
                __m512 a = _mm512_set1_ps(alpha[i]);
                for (int j = 0; j < D; j += 16)
                    _mm512_storeu_ps(sc->O + i * D + j, _mm512_mul_ps(a, _mm512_loadu_ps(sc->O + i * D + j)));
            }
            mm64(B, B, sc->Pb, B, sc->Vr + (size_t)jb * B * D, 2 * D, sc->O, D, 1);
        }
        for (int i = 0; i < B && ib * B + i < n; i++) {
            int t = t0 + ib * B + i;
            __m512 inv = _mm512_set1_ps(1.0f / l[i]);
            for (int j = 0; j < D; j += 16)
                store_bf16(job->o + ((size_t)t * job->H + h) * D + j, _mm512_mul_ps(inv, _mm512_loadu_ps(sc->O + i * D + j)));
            job->lse[(size_t)h * job->T + t] = m[i] + logf(l[i]);
        }
    }
}

/* rows [np][64] -> columns [64][np] (the A operand of a product over the rows). */
static void transpose_rows(bf16 *out, const bf16 *rows, int np) {
    for (int t = 0; t < np; t++)
        for (int c = 0; c < D; c++) out[(size_t)c * np + t] = rows[t * D + c];
}

/* Rows i, i + 1 of a tile (16 columns each) as bf16 pairs: dst[2 c + {0, 1}] = (r0[c], r1[c]). */
static inline void store_pairs(bf16 *dst, __m512 r0, __m512 r1) {
    static const uint16_t idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(r0)),
                                      (__m256i)_mm512_cvtneps_pbh(r1), 1);
    _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(_mm512_loadu_si512(idx), both));
}

/* Backward tiles of (ib, jb): P from the saved lse, dS = P (dP - delta); accumulates dV^T, dK^T (per key block)
 * and dQ. P and dS are kept as row pairs (the B operand of dV^T = dO^T P, dK^T = Q^T dS), dS also row-major. */
static void backward_tile(Job *job, Scratch *sc, int np, int n, int ib, int jb) {
    scores(sc->S, sc->Q, sc->Kc, np, ib, jb, n, job->scale);
    mm64(B, D, sc->dO + (size_t)ib * B * D, D, sc->Vc + 2 * jb * B, 2 * np, sc->dP, B, 0);
    __m512 scale = _mm512_set1_ps(job->scale);
    for (int i = 0; i < B; i += 2) {
        const float *l = sc->lse + ib * B + i, *dl = sc->delta + ib * B + i;
        for (int j = 0; j < B; j += 16) {
            __m512 p[2], ds[2];
            for (int r = 0; r < 2; r++) {
                p[r] = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc->S + (i + r) * B + j), _mm512_set1_ps(l[r])));
                ds[r] = _mm512_mul_ps(scale, _mm512_mul_ps(p[r], _mm512_sub_ps(_mm512_loadu_ps(sc->dP + (i + r) * B + j),
                                                                                 _mm512_set1_ps(dl[r]))));
                store_bf16(sc->dSb + (i + r) * B + j, ds[r]);
            }
            store_pairs(sc->Pt + i * B + 2 * j, p[0], p[1]);
            store_pairs(sc->dSt + i * B + 2 * j, ds[0], ds[1]);
        }
    }
    mm64(D, B, sc->dOr + ib * B, np, sc->Pt, 2 * B, sc->dV, B, 1);
    mm64(D, B, sc->Qr + ib * B, np, sc->dSt, 2 * B, sc->dK, B, 1);
    mm64(B, B, sc->dSb, B, sc->Kr + (size_t)jb * B * D, 2 * D, sc->dQ + (size_t)ib * B * D, D, 1);
}

static void backward_unit(Job *job, Scratch *sc, int seg, int h) {
    int t0 = job->seg[seg], n = job->seg[seg + 1] - t0, np = (n + B - 1) / B * B, g = h / (job->H / job->G);
    long kv0 = g * job->kv_sh + (long)t0 * job->kv_st;
    copy_rows(sc->Q, job->q + h * job->q_sh + (long)t0 * job->q_st, job->q_st, n, np);
    transpose_rows(sc->Qr, sc->Q, np);
    copy_rows(sc->Vc, job->k + kv0, job->kv_st, n, np);
    pack_cols(sc->Kc, sc->Vc, np);
    pack_rows(sc->Kr, sc->Vc, np);
    copy_rows(sc->dO, job->v + kv0, job->kv_st, n, np);
    pack_cols(sc->Vc, sc->dO, np);
    copy_rows(sc->dO, job->dout + ((size_t)t0 * job->H + h) * D, (long)job->H * D, n, np);
    transpose_rows(sc->dOr, sc->dO, np);
    for (int i = 0; i < np; i++) { /* delta = rowsum(dO * O); padding rows: delta = 0, P = 0 */
        float acc = 0.0f;
        if (i < n) {
            const bf16 *o = job->o + ((size_t)(t0 + i) * job->H + h) * D;
            for (int j = 0; j < D; j++) acc += bf2f(sc->dO[i * D + j]) * bf2f(o[j]);
        }
        sc->delta[i] = acc;
        sc->lse[i] = i < n ? job->lse[(size_t)h * job->T + t0 + i] : INFINITY;
    }
    memset(sc->dQ, 0, (size_t)np * D * 4);
    for (int jb = 0; jb < np / B; jb++) {
        memset(sc->dK, 0, B * D * 4);
        memset(sc->dV, 0, B * D * 4);
        for (int ib = jb; ib < np / B; ib++) backward_tile(job, sc, np, n, ib, jb);
        for (int j = 0; j < B && jb * B + j < n; j++) {
            size_t row = ((size_t)h * job->T + t0 + jb * B + j) * D;
            for (int c = 0; c < D; c++) {
                job->dk[row + c] = sc->dK[c * B + j];
                job->dv[row + c] = sc->dV[c * B + j];
            }
        }
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < D; j += 16)
            store_bf16(job->dq + ((size_t)h * job->T + t0 + i) * D + j, _mm512_loadu_ps(sc->dQ + i * D + j));
}

static int max_len(const Job *job) {
    int mx = 0;
    for (int s = 0; s < job->n_seg; s++)
        if (job->seg[s + 1] - job->seg[s] > mx) mx = job->seg[s + 1] - job->seg[s];
    return mx;
}

static int cmp_desc(const void *a, const void *b, void *ctx) {
    const Job *job = ctx;
    int ua = *(const int *)a, ub = *(const int *)b;
    int la = job->seg[ua / job->H + 1] - job->seg[ua / job->H], lb = job->seg[ub / job->H + 1] - job->seg[ub / job->H];
    return lb - la;
}

/* Units shared out dynamically on PyTorch's own OpenMP threads (the process has loaded its libgomp.so.1 first). */
static void run(Job *job, int backward) {
    job->n_units = job->n_seg * job->H;
    job->order = malloc(sizeof(int) * job->n_units);
    for (int u = 0; u < job->n_units; u++) job->order[u] = u;
    qsort_r(job->order, job->n_units, sizeof(int), cmp_desc, job);
    int np = (max_len(job) + B - 1) / B * B;
#pragma omp parallel num_threads(job->threads < 1 ? 1 : job->threads)
    {
        Scratch sc;
        alloc_scratch(&sc, np);
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < job->n_units; i++) {
            int u = job->order[i];
            if (backward) backward_unit(job, &sc, u / job->H, u % job->H);
            else forward_unit(job, &sc, u / job->H, u % job->H);
        }
        free_scratch(&sc);
    }
    free(job->order);
}

void dt_attn_forward(int T, int H, int G, const int *seg, int n_seg, const bf16 *q, long q_sh, long q_st,
                     const bf16 *k, const bf16 *v, long kv_sh, long kv_st, float scale, bf16 *o, float *lse,
                     int threads) {
    Job job = {.T = T, .H = H, .G = G, .n_seg = n_seg, .threads = threads, .seg = seg, .q = q, .k = k, .v = v,
               .q_sh = q_sh, .q_st = q_st, .kv_sh = kv_sh, .kv_st = kv_st, .o = o, .lse = lse, .scale = scale};
    run(&job, 0);
}

void dt_attn_backward(int T, int H, int G, const int *seg, int n_seg, const bf16 *q, long q_sh, long q_st,
                      const bf16 *k, const bf16 *v, long kv_sh, long kv_st, float scale, const bf16 *o,
                      const float *lse, const bf16 *dout, bf16 *dq, float *dk, float *dv, int threads) {
    Job job = {.T = T, .H = H, .G = G, .n_seg = n_seg, .threads = threads, .seg = seg, .q = q, .k = k, .v = v,
               .q_sh = q_sh, .q_st = q_st, .kv_sh = kv_sh, .kv_st = kv_st, .o = (bf16 *)o, .lse = (float *)lse,
               .dout = dout, .dq = dq, .dk = dk, .dv = dv, .scale = scale};
    run(&job, 1);
}
