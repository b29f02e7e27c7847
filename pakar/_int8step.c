/* pakar._int8step: the decode step of an int8 pakar model (pakar/quant.py) as one C call.

Why C: at batch 1 an eager PyTorch step of `small` (1.3-1.8 ms) spends three quarters of its time
on ~430 operator calls (dispatch, allocation, the interpreter between them), not on arithmetic;
llama.cpp's whole q8_0 token takes ~0.5 ms because it runs plain loops over preallocated buffers. This file is that
step's arithmetic in plain loops, called once per step for all rows (~0.3 ms on `small`), and
nothing else: one scratch block passed in, int8 dot products with AVX-512 (VNNI) or AVX2 intrinsics
where the compiler was told the CPU has them (setup.py: -march=native) and plain C otherwise, and
the big products split over worker threads (POSIX; see matmul_i8_mt).

It computes what pakar.quant.Int8Row (one row) and Transformer.decode_step over the int8 modules
(several rows) compute, with the same quantisation: each input vector rounded to int8 with its own
symmetric step max|x| / 127 (round half to even, as torch.round), int8 x int8 products summed in
exact int32, then the weight's per-output-channel scale, the input's step and the RMSNorm's 1/rms;
everything between the products in float32 (softmax sums in double). tests/test_quant.py holds it
to the module path's logits, keys and values and greedy tokens.

Layout (all contiguous, row-major, pointers into the model's own tensors, kept alive by Python):
  embed (V, D) f32; final_norm (D); cos, sin (W, K) rotate-half tables; head (V, D) i8 + scale (V)
  per layer: ln1, ln2 (D); qkv (X, D) i8 + scale (X), X = H*K + 2*G*K (q, then k, then v rows);
  q_norm, k_norm (K); o (D, H*K) i8 + scale (D); router (E, D) f32 or NULL (dense: one "expert"
  every row takes with weight 1); bias (E) or NULL; gate_up (E, 2I, D) i8 + scale (E, 2I), gate rows
  first; down (E, D, I) i8 + scale (E, D).
  cache k, v: (L, B, G, C, K) f32; the step writes column S of every row and attends, for row b,
  over the columns c <= S where mask[b * mask_stride + c] is non-zero (mask NULL: the last pos[b] + 1
  columns, the row's own tokens).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *ln1, *ln2;
    const int8_t *qkv;
    const float *qkv_scale, *q_norm, *k_norm;
    const int8_t *o;
    const float *o_scale, *router, *bias;
    const int8_t *gate_up;
    const float *gate_up_scale;
    const int8_t *down;
    const float *down_scale;
} Layer;

typedef struct {
    int64_t D, H, G, K, E, top_k, I, V, L, norm_topk, W;  /* W: rows of the rotary tables */
    double eps;
    const float *embed, *final_norm, *cos, *sin;
    const int8_t *head;
    const float *head_scale;
    const Layer *layers;
} Model;

/* Float sums as 16 independent partial sums, then added in order: the compiler keeps the 16 in one
   vector register (it may not reorder a single running sum), so these run at vector speed. */
#define PARTS 16
static float dot(const float *a, const float *b, int64_t n) {
    float part[PARTS] = {0};
    int64_t i = 0;
    for (; i + PARTS <= n; i += PARTS)
        for (int j = 0; j < PARTS; j++) part[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < PARTS; j++) s += part[j];
    return s;
}

static inline float bigger(float a, float b) { return a > b ? a : b; }  /* fmaxf is a libm call */

static float max_abs(const float *x, int64_t n) {
    float part[PARTS] = {0};
    int64_t i = 0;
    for (; i + PARTS <= n; i += PARTS)
        for (int j = 0; j < PARTS; j++) part[j] = bigger(part[j], fabsf(x[i + j]));
    float m = 0.0f;
    for (; i < n; i++) m = bigger(m, fabsf(x[i]));
    for (int j = 0; j < PARTS; j++) m = bigger(m, part[j]);
    return m;
}

/* Round x (n floats) to int8 levels with step max|x| / 127, stored as int16 (what the products
   read); returns the step (0 for an all-zero x). */
static double quantize(const float *x, int64_t n, int16_t *q) {
    const float m = max_abs(x, n);
    const float f = m > 0.0f ? (float)(127.0 / (double)m) : 0.0f;
    for (int64_t i = 0; i < n; i++) q[i] = (int16_t)nearbyintf(x[i] * f);
    return (double)m / 127.0;
}

/* sum_i x[i] * w_r[i] for four int8 weight rows w_r = w + r * n against one int16 row x (values
   within +-127, so each pair of products fits the 32-bit lanes of madd exactly), into y[0..3]: dot4,
   with tail4 for what is left after the vector loop. */
static inline void tail4(const int16_t *x, const int8_t *w, int64_t n, int64_t from, int32_t *y) {
    for (int64_t i = from; i < n; i++) {
        y[0] += x[i] * w[i];
        y[1] += x[i] * w[n + i];
        y[2] += x[i] * w[2 * n + i];
        y[3] += x[i] * w[3 * n + i];
    }
}

/* The vector kernel, one source for two widths: a vector of 16-bit inputs (VEC), its load (LOAD_X),
   the widening load of int8 weights (LOAD_W), the pairwise multiply-add into 32-bit lanes (DP), and
   the lane sums of four accumulators as one tree (SUM4: four separate reductions cost as much as the
   products at these widths). */
#if defined(__AVX512BW__)
#include <immintrin.h>
#define VEC __m512i
#define LANES 32
#define ZERO() _mm512_setzero_si512()
#define LOAD_X(p) _mm512_loadu_si512((const void *)(p))
#define LOAD_W(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#if defined(__AVX512VNNI__)
#define DP(acc, x, w) _mm512_dpwssd_epi32(acc, x, w)
#else
#define DP(acc, x, w) _mm512_add_epi32(acc, _mm512_madd_epi16(x, w))
#endif
#define HALVES(a) _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1))
#elif defined(__AVX2__)
#include <immintrin.h>
#define VEC __m256i
#define LANES 16
#define ZERO() _mm256_setzero_si256()
#define LOAD_X(p) _mm256_loadu_si256((const __m256i *)(p))
#define LOAD_W(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define DP(acc, x, w) _mm256_add_epi32(acc, _mm256_madd_epi16(x, w))
#define HALVES(a) (a)
#endif

#if defined(VEC)
static inline void sum4(VEC a0, VEC a1, VEC a2, VEC a3, int32_t *y) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(HALVES(a0), HALVES(a1)),
                                        _mm256_hadd_epi32(HALVES(a2), HALVES(a3)));
    _mm_storeu_si128((__m128i *)y, _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
}

static void dot4(const int16_t *x, const int8_t *w, int64_t n, int32_t *y) {
    VEC a0 = ZERO(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const VEC xv = LOAD_X(x + i);
        a0 = DP(a0, xv, LOAD_W(w + i));
        a1 = DP(a1, xv, LOAD_W(w + n + i));
        a2 = DP(a2, xv, LOAD_W(w + 2 * n + i));
        a3 = DP(a3, xv, LOAD_W(w + 3 * n + i));
    }
    sum4(a0, a1, a2, a3, y);
    tail4(x, w, n, i, y);
}
#else
static void dot4(const int16_t *x, const int8_t *w, int64_t n, int32_t *y) {
    y[0] = y[1] = y[2] = y[3] = 0;
    tail4(x, w, n, 0, y);
}
#endif

/* y[b * O + o] = sum_i x[b * n + i] * w[o * n + i] for B rows against the int8 weight rows o in
   [o0, o1), in int32; four weight rows at a time, read once for all B rows (they stay in L1 between
   them). */
static void matmul_rows(const int16_t *x, int64_t B, const int8_t *w, int64_t O, int64_t n, int32_t *y,
                        int64_t o0, int64_t o1) {
    int32_t t[4];
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4)
        for (int64_t b = 0; b < B; b++) {
            dot4(x + b * n, w + o * n, n, t);
            memcpy(y + b * O + o, t, sizeof t);
        }
    for (; o < o1; o++)  /* the last (o1 - o0) % 4 rows */
        for (int64_t b = 0; b < B; b++) {
            int32_t s = 0;
            for (int64_t i = 0; i < n; i++) s += x[b * n + i] * w[o * n + i];
            y[b * O + o] = s;
        }
}

/* Threads for the big products. At batch 1 a model whose weights do not fit the caches is bound by
   memory bandwidth, which one core cannot use up: `threads` (PyTorch's intra-op count, passed by the
   caller) split a product's weight rows, each row computed whole by one thread, so the result does not
   depend on the thread count. Persistent workers spin briefly between products (a step's products
   come microseconds apart), then sleep on a condition variable. Products under SPLIT_MACS stay on the
   calling thread: their arithmetic is shorter than a hand-off. POSIX threads; elsewhere (Windows) the
   step runs on one thread. */
#define SPLIT_MACS (1 << 18)
#if !defined(_WIN32)
#include <pthread.h>
#include <stdatomic.h>
#define MAX_WORKERS 63
#define SPINS (1 << 14)

typedef struct {
    const int16_t *x;
    int64_t B, O, n, rows;  /* rows per part, a multiple of 4 */
    const int8_t *w;
    int32_t *y;
} Product;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    int started;          /* workers running */
    unsigned long birth;  /* gen when the newest worker was started (pthread_create orders it) */
    /* one value per product: a count times 256 plus the product's parts (caller included), so that a
       worker reads which product is out and whether it takes part in one load; the task it then reads
       stays as it is until every part is done */
    atomic_ulong gen;
    atomic_int done, sleepers;
    Product task;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, {0}};
static pthread_mutex_t step_lock = PTHREAD_MUTEX_INITIALIZER;  /* one step at a time uses the pool */

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void part(const Product *t, int64_t k) {
    const int64_t o0 = k * t->rows, o1 = o0 + t->rows < t->O ? o0 + t->rows : t->O;
    if (o0 < o1) matmul_rows(t->x, t->B, t->w, t->O, t->n, t->y, o0, o1);
}

static void *worker(void *arg) {
    const int me = (int)(intptr_t)arg;  /* 1, 2, ...: the caller does part 0 */
    unsigned long seen = pool.birth, g;  /* not a fresh load: the first product may be out already */
    for (;;) {
        for (int spins = 0; (g = atomic_load(&pool.gen)) == seen; spins++) {
            if (spins < SPINS) {
                relax();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleepers, 1);
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = g;
        if (me < (int)(g % 256)) {
            part(&pool.task, me);
            atomic_fetch_add(&pool.done, 1);
        }
    }
    return NULL;
}

static void matmul_i8_mt(const int16_t *x, int64_t B, const int8_t *w, int64_t O, int64_t n, int32_t *y,
                         int threads) {
    if (threads > MAX_WORKERS + 1) threads = MAX_WORKERS + 1;
    while (pool.started < threads - 1) {  /* workers are started once, on first need, and kept */
        pthread_t th;
        pool.birth = atomic_load(&pool.gen);
        if (pthread_create(&th, NULL, worker, (void *)(intptr_t)(pool.started + 1)) != 0) break;
        pthread_detach(th);
        pool.started++;
    }
    if (threads > pool.started + 1) threads = pool.started + 1;
    if (threads < 2 || B * O * n < SPLIT_MACS) {
        matmul_rows(x, B, w, O, n, y, 0, O);
        return;
    }
    const int64_t rows = ((O + threads - 1) / threads + 3) / 4 * 4;
    pool.task = (Product){x, B, O, n, rows, w, y};
    atomic_store(&pool.done, 0);
    atomic_store(&pool.gen, (atomic_load(&pool.gen) / 256 + 1) * 256 + threads);  /* publishes the task */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mu);
    }
    part(&pool.task, 0);
    while (atomic_load(&pool.done) < threads - 1) relax();
}
/* A forked child has none of the parent's workers: it starts its own when it needs them. */
static void after_fork_in_child(void) {
    pool.started = 0;
    atomic_store(&pool.sleepers, 0);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_mutex_init(&step_lock, NULL);
}
#define AT_FORK() pthread_atfork(NULL, NULL, after_fork_in_child)
#define LOCK_STEP() pthread_mutex_lock(&step_lock)
#define UNLOCK_STEP() pthread_mutex_unlock(&step_lock)
#else
static void matmul_i8_mt(const int16_t *x, int64_t B, const int8_t *w, int64_t O, int64_t n, int32_t *y,
                         int threads) {
    (void)threads;
    matmul_rows(x, B, w, O, n, y, 0, O);
}
#define AT_FORK() 0
#define LOCK_STEP()
#define UNLOCK_STEP()
#endif

/* 1 / rms(x) */
static double inv_rms(const float *x, int64_t n, double eps) {
    return 1.0 / sqrt((double)dot(x, x, n) / (double)n + eps);
}

/* x * w (elementwise) into h */
static void times(const float *x, const float *w, int64_t n, float *h) {
    for (int64_t i = 0; i < n; i++) h[i] = x[i] * w[i];
}

/* Each row b of x (B, D) before a product: r[b] = its 1/rms, h = x * weight (the norm without its
   1/rms, which the product's output takes as a scale), q = h rounded to int8 levels, step[b] their
   step. */
static void norm_quantize(const float *x, const float *weight, int64_t B, int64_t D, double eps, float *h,
                          int16_t *q, double *r, double *step) {
    for (int64_t b = 0; b < B; b++) {
        r[b] = inv_rms(x + b * D, D, eps);
        times(x + b * D, weight, D, h + b * D);
        step[b] = quantize(h + b * D, D, q + b * D);
    }
}

/* Per-head RMSNorm (weight w) then rotary embedding (rotate-half, position's cos/sin), in place. */
static void norm_rope(float *v, int64_t K, const float *w, double eps, const float *cos, const float *sin) {
    const float r = (float)inv_rms(v, K, eps);
    const int64_t half = K / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i] * w[i], b = v[i + half] * w[i + half];
        v[i] = (a * cos[i] - b * sin[i]) * r;
        v[i + half] = (b * cos[i + half] + a * sin[i + half]) * r;
    }
}

static float silu(float g) { return g / (1.0f + expf(-g)); }

typedef struct {
    int64_t B, S, C;  /* rows, the column this step writes, the cache's columns */
    const int64_t *tokens, *pos;  /* (B) the tokens fed, their positions (a row's length - 1) */
    const uint8_t *mask;  /* (B, mask_stride) the columns each row attends to, or NULL */
    int64_t mask_stride;
    float *cache_k, *cache_v, *logits;  /* (L, B, G, C, K) twice, (B, V) */
    int threads;  /* for the big products */
} Step;

static int64_t max2(int64_t a, int64_t b) { return a > b ? a : b; }

/* The scratch a step needs, carved in order from one block (64-byte aligned pieces); with base NULL
   only the size is computed. */
typedef struct {
    float *x, *h, *qkv, *p, *f;
    int32_t *y;
    int16_t *q8, *xe, *qa;
    double *step, *r, *sa;
    int64_t *chosen, *rows;
    float *gate_w, *wts;
} Work;

static size_t carve(size_t *at, size_t bytes) {
    size_t start = (*at + 63) & ~(size_t)63;
    *at = start + bytes;
    return start;
}

static size_t layout(const Model *m, int64_t B, int64_t C, char *base, Work *w) {
    const int64_t D = m->D, A = m->H * m->K, X = A + 2 * m->G * m->K, J2 = 2 * m->I, TK = m->top_k;
    const int64_t wide = max2(D, max2(A, m->I));
    size_t at = 0, o;
#define PIECE(field, type, n) o = carve(&at, (size_t)(n) * sizeof(type)); if (base) w->field = (type *)(base + o);
    PIECE(x, float, B * D)
    PIECE(h, float, B * wide)
    PIECE(qkv, float, B * X)
    PIECE(p, float, max2(C, m->E))
    PIECE(f, float, J2)
    PIECE(y, int32_t, B * max2(max2(X, D), max2(J2, m->V)))
    PIECE(q8, int16_t, B * wide)
    PIECE(xe, int16_t, B * D)
    PIECE(qa, int16_t, B * m->I)
    PIECE(step, double, B)
    PIECE(r, double, B)
    PIECE(sa, double, B)
    PIECE(chosen, int64_t, B * TK)
    PIECE(rows, int64_t, B)
    PIECE(gate_w, float, B * TK)
    PIECE(wts, float, B)
#undef PIECE
    return at + 64;
}

static void run(const Model *m, const Step *st, char *block) {
    const int64_t B = st->B, D = m->D, H = m->H, G = m->G, K = m->K, I = m->I, V = m->V, TK = m->top_k;
    const int64_t A = H * K, X = A + 2 * G * K, J = H / G, S = st->S, C = st->C, J2 = 2 * I;
    const double eps = m->eps;
    const float scale = (float)(1.0 / sqrt((double)K));
    Work w = {0};
    layout(m, B, C, (char *)(((uintptr_t)block + 63) & ~(uintptr_t)63), &w);
    float *x = w.x, *h = w.h, *p = w.p, *f = w.f;
    int32_t *y = w.y;
    int16_t *q8 = w.q8;
    double *step = w.step, *r = w.r;

    for (int64_t b = 0; b < B; b++) memcpy(x + b * D, m->embed + st->tokens[b] * D, D * sizeof(float));

    for (int64_t l = 0; l < m->L; l++) {
        const Layer *ly = &m->layers[l];
        float *kc = st->cache_k + l * B * G * C * K, *vc = st->cache_v + l * B * G * C * K;
        /* attention: q, k and v as one product of the normed input */
        norm_quantize(x, ly->ln1, B, D, eps, h, q8, r, step);
        matmul_i8_mt(q8, B, ly->qkv, X, D, y, st->threads);
        for (int64_t b = 0; b < B; b++) {
            float *qb = w.qkv + b * X;
            const float sr = (float)(step[b] * r[b]);
            for (int64_t o = 0; o < X; o++) qb[o] = (float)y[b * X + o] * ly->qkv_scale[o] * sr;
            const float *cs = m->cos + st->pos[b] * K, *sn = m->sin + st->pos[b] * K;
            for (int64_t hh = 0; hh < H; hh++) norm_rope(qb + hh * K, K, ly->q_norm, eps, cs, sn);
            for (int64_t g = 0; g < G; g++) {
                norm_rope(qb + A + g * K, K, ly->k_norm, eps, cs, sn);
                memcpy(kc + ((b * G + g) * C + S) * K, qb + A + g * K, K * sizeof(float));
                memcpy(vc + ((b * G + g) * C + S) * K, qb + A + G * K + g * K, K * sizeof(float));
            }
            const uint8_t *mk = st->mask ? st->mask + b * st->mask_stride : NULL;
            const int64_t c0 = mk ? 0 : S - st->pos[b];
            float *out = h + b * A;
            for (int64_t hh = 0; hh < H; hh++) {
                const float *qh = qb + hh * K;
                const float *keys = kc + (b * G + hh / J) * C * K, *vals = vc + (b * G + hh / J) * C * K;
                float mx = -INFINITY;
                for (int64_t c = c0; c <= S; c++) {
                    if (mk && !mk[c]) continue;
                    p[c] = dot(qh, keys + c * K, K) * scale;
                    mx = p[c] > mx ? p[c] : mx;
                }
                double sum = 0.0;
                for (int64_t c = c0; c <= S; c++) {
                    if (mk && !mk[c]) continue;
                    sum += (p[c] = expf(p[c] - mx));
                }
                const float inv = (float)(1.0 / sum);
                float *oh = out + hh * K;
                memset(oh, 0, K * sizeof(float));
                for (int64_t c = c0; c <= S; c++) {
                    if (mk && !mk[c]) continue;
                    const float pc = p[c] * inv, *vv = vals + c * K;
                    for (int64_t i = 0; i < K; i++) oh[i] += pc * vv[i];
                }
            }
            step[b] = quantize(out, A, q8 + b * A);
        }
        matmul_i8_mt(q8, B, ly->o, D, A, y, st->threads);
        for (int64_t b = 0; b < B; b++) {
            const float s = (float)step[b];
            for (int64_t o = 0; o < D; o++) x[b * D + o] += s * (float)y[b * D + o] * ly->o_scale[o];
        }

        /* feed-forward: the router in float32, then per expert the rows that chose it, together */
        norm_quantize(x, ly->ln2, B, D, eps, h, q8, r, step);
        for (int64_t b = 0; b < B; b++) {
            float *hb = h + b * D;
            step[b] *= r[b];  /* the experts' input scale: the norm's 1/rms with the input's step */
            int64_t *ch = w.chosen + b * TK;
            float *cw = w.gate_w + b * TK;
            if (!ly->router) {  /* a dense MLP: one expert, weight 1 */
                ch[0] = 0;
                cw[0] = 1.0f;
                continue;
            }
            float mx = -INFINITY;
            for (int64_t e = 0; e < m->E; e++) {
                p[e] = dot(ly->router + e * D, hb, D) * (float)r[b];
                mx = p[e] > mx ? p[e] : mx;
            }
            double sum = 0.0;
            for (int64_t e = 0; e < m->E; e++) sum += (p[e] = expf(p[e] - mx));
            for (int64_t e = 0; e < m->E; e++) p[e] = (float)(p[e] / sum);
            double total = 0.0;
            for (int64_t k = 0; k < TK; k++) {  /* the k-th largest probability + bias; the first on ties */
                int64_t best = -1;
                float bv = -INFINITY;
                for (int64_t e = 0; e < m->E; e++) {
                    int taken = 0;
                    for (int64_t j = 0; j < k; j++) taken |= ch[j] == e;
                    const float v = p[e] + (ly->bias ? ly->bias[e] : 0.0f);
                    if (!taken && (best < 0 || v > bv)) best = e, bv = v;
                }
                ch[k] = best;
                cw[k] = p[best];
                total += p[best];
            }
            if (m->norm_topk)
                for (int64_t k = 0; k < TK; k++) cw[k] = (float)(cw[k] / total);
        }
        const int64_t experts = ly->router ? m->E : 1, nk = ly->router ? TK : 1;
        for (int64_t e = 0; e < experts; e++) {
            int64_t n = 0;
            for (int64_t b = 0; b < B; b++)
                for (int64_t k = 0; k < nk; k++)
                    if (w.chosen[b * TK + k] == e) {
                        w.rows[n] = b;
                        w.wts[n] = w.gate_w[b * TK + k];
                        memcpy(w.xe + n * D, q8 + b * D, D * sizeof(int16_t));
                        n++;
                    }
            if (!n) continue;
            const float *sgu = ly->gate_up_scale + e * J2, *sd = ly->down_scale + e * D;
            matmul_i8_mt(w.xe, n, ly->gate_up + e * J2 * D, J2, D, y, st->threads);
            for (int64_t j = 0; j < n; j++) {
                const float s = (float)step[w.rows[j]];
                const int32_t *yj = y + j * J2;
                for (int64_t o = 0; o < J2; o++) f[o] = (float)yj[o] * sgu[o] * s;
                for (int64_t i = 0; i < I; i++) f[i] = silu(f[i]) * f[I + i];
                w.sa[j] = quantize(f, I, w.qa + j * I);
            }
            matmul_i8_mt(w.qa, n, ly->down + e * D * I, D, I, y, st->threads);
            for (int64_t j = 0; j < n; j++) {
                const float s = (float)(w.wts[j] * w.sa[j]);
                float *xb = x + w.rows[j] * D;
                for (int64_t o = 0; o < D; o++) xb[o] += s * (float)y[j * D + o] * sd[o];
            }
        }
    }
    norm_quantize(x, m->final_norm, B, D, eps, h, q8, r, step);
    matmul_i8_mt(q8, B, m->head, V, D, y, st->threads);
    for (int64_t b = 0; b < B; b++) {
        const float s = (float)(step[b] * r[b]);
        for (int64_t v = 0; v < V; v++) st->logits[b * V + v] = (float)y[b * V + v] * m->head_scale[v] * s;
    }
}

/* Python: work_bytes(model, B, C) -> the scratch size a step of B rows over C columns needs. */
static PyObject *work_bytes(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "work_bytes(model, B, C)");
        return NULL;
    }
    const Model *m = (const Model *)PyLong_AsVoidPtr(args[0]);
    int64_t B = PyLong_AsLongLong(args[1]), C = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromSize_t(layout(m, B, C, NULL, NULL));
}

/* Python: step(model, work, B, S, C, tokens, pos, mask, mask_stride, cache_k, cache_v, logits, threads),
   the pointers as ints (tensors' data_ptr(); mask 0 for none). Releases the GIL while it runs. */
static PyObject *step(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "step() takes 13 arguments");
        return NULL;
    }
    const Model *m = (const Model *)PyLong_AsVoidPtr(args[0]);
    char *work = (char *)PyLong_AsVoidPtr(args[1]);
    Step st;
    st.B = PyLong_AsLongLong(args[2]);
    st.S = PyLong_AsLongLong(args[3]);
    st.C = PyLong_AsLongLong(args[4]);
    st.tokens = (const int64_t *)PyLong_AsVoidPtr(args[5]);
    st.pos = (const int64_t *)PyLong_AsVoidPtr(args[6]);
    st.mask = (const uint8_t *)PyLong_AsVoidPtr(args[7]);
    st.mask_stride = PyLong_AsLongLong(args[8]);
    st.cache_k = (float *)PyLong_AsVoidPtr(args[9]);
    st.cache_v = (float *)PyLong_AsVoidPtr(args[10]);
    st.logits = (float *)PyLong_AsVoidPtr(args[11]);
    st.threads = (int)PyLong_AsLong(args[12]);
    if (PyErr_Occurred()) return NULL;
    /* what the loops index with: out of range would read or write outside the tensors */
    int ok = st.B >= 1 && 0 <= st.S && st.S < st.C && (st.mask ? st.mask_stride > st.S : st.mask_stride == 0);
    for (int64_t b = 0; ok && b < st.B; b++)
        ok = 0 <= st.tokens[b] && st.tokens[b] < m->V && 0 <= st.pos[b] && st.pos[b] < m->W && st.pos[b] <= st.S;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "int8 step: a token, position or cache column out of range");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    LOCK_STEP();
    run(m, &st, work);
    UNLOCK_STEP();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"work_bytes", (PyCFunction)(void (*)(void))work_bytes, METH_FASTCALL, "scratch bytes for a step"},
    {"step", (PyCFunction)(void (*)(void))step, METH_FASTCALL, "one int8 decode step"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_int8step", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__int8step(void) {
    if (AT_FORK() != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pakar._int8step: pthread_atfork failed");
        return NULL;
    }
    return PyModule_Create(&module);
}
