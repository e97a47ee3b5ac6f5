/* float32 kernels for x86-64 CPUs with AVX2, FMA and F16C, built at run time by
 * batchlm/kernels/cpu_native.py: a GEMM over panel-packed weights (batchlm_gemm_f32) and decode attention
 * straight from the paged KV cache, float32 or half (batchlm_paged_decode).
 *
 * GEMM: out[M, N] = x[M, K] @ W^T (+ bias). Decode steps multiply a few rows (one per running
 * request) by every weight; torch's BLAS packs the weight on each such call and reaches about half the
 * machine's FMA rate there. Here the weight is stored transposed ([in, out], as BLAS's "NN" case wants
 * for large batches too) and read in place: each thread takes a range of 16-column panels and, for each
 * panel, runs every group of up to 6 rows over it while it is still in cache. 6 rows x 16 columns keeps
 * 12 accumulators in registers, and each k step does 2 weight loads and 6 broadcasts for 12 FMAs.
 *
 * Threads come from OpenMP; loaded after torch, this library binds to torch's own libgomp (same
 * soname), so it shares torch's worker threads instead of competing with a second pool.
 */
#include <float.h>
#include <math.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PANEL 16
#define ROWS 6
/* Rows taken over every panel before moving on: their inputs stay in this core's L2 cache. */
#define ROW_BLOCK 256
/* How far ahead (in k rows) the first row group prefetches the panel from memory. */
#define PREFETCH_K 16

static inline __m256i tail_mask(long valid) {
    /* lanes [0, valid) set, valid in [0, 8] */
    const int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(lanes + 8 - valid));
}

/* One group of R rows (R <= ROWS) against one panel of up to 16 columns starting at wt. */
static inline __attribute__((always_inline)) void panel_rows(
    const int R, const float *x, long ldx, const float *wt, long ldw, const float *bias, float *out,
    long ldo, long K, long cols, int prefetch) {
    __m256 lo[ROWS], hi[ROWS];
    const int full = cols == PANEL;
    const __m256i mask_lo = tail_mask(cols < 8 ? cols : 8);
    const __m256i mask_hi = tail_mask(cols > 8 ? cols - 8 : 0);
    __m256 bias_lo = _mm256_setzero_ps(), bias_hi = _mm256_setzero_ps();
    if (bias) {
        bias_lo = full ? _mm256_loadu_ps(bias) : _mm256_maskload_ps(bias, mask_lo);
        bias_hi = full ? _mm256_loadu_ps(bias + 8) : _mm256_maskload_ps(bias + 8, mask_hi);
    }
    for (int r = 0; r < R; r++) {
        lo[r] = bias_lo;
        hi[r] = bias_hi;
    }
    if (full) {
        for (long k = 0; k < K; k++) {
            const float *w = wt + k * ldw;
            if (prefetch) _mm_prefetch((const char *)(w + PREFETCH_K * ldw), _MM_HINT_T0);
            const __m256 w_lo = _mm256_loadu_ps(w);
            const __m256 w_hi = _mm256_loadu_ps(w + 8);
            for (int r = 0; r < R; r++) {
                const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
                lo[r] = _mm256_fmadd_ps(xv, w_lo, lo[r]);
                hi[r] = _mm256_fmadd_ps(xv, w_hi, hi[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(out + r * ldo, lo[r]);
            _mm256_storeu_ps(out + r * ldo + 8, hi[r]);
        }
    } else {
        for (long k = 0; k < K; k++) {
            const float *w = wt + k * ldw;
            const __m256 w_lo = _mm256_maskload_ps(w, mask_lo);
            const __m256 w_hi = _mm256_maskload_ps(w + 8, mask_hi);
            for (int r = 0; r < R; r++) {
                const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
                lo[r] = _mm256_fmadd_ps(xv, w_lo, lo[r]);
                hi[r] = _mm256_fmadd_ps(xv, w_hi, hi[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            _mm256_maskstore_ps(out + r * ldo, mask_lo, lo[r]);
            _mm256_maskstore_ps(out + r * ldo + 8, mask_hi, hi[r]);
        }
    }
}

static void panel_all_rows(const float *x, long ldx, const float *wt, long ldw, const float *bias, float *out,
                           long ldo, long M, long K, long cols) {
    for (long m = 0; m < M; m += ROWS) {
        const long rows = M - m < ROWS ? M - m : ROWS;
        const float *xm = x + m * ldx;
        float *om = out + m * ldo;
        /* Only the first group streams the panel from memory; later ones find it in cache. */
        const int prefetch = m == 0 && cols == PANEL;
        switch (rows) {
            case 6: panel_rows(6, xm, ldx, wt, ldw, bias, om, ldo, K, cols, prefetch); break;
            case 5: panel_rows(5, xm, ldx, wt, ldw, bias, om, ldo, K, cols, prefetch); break;
            case 4: panel_rows(4, xm, ldx, wt, ldw, bias, om, ldo, K, cols, prefetch); break;
            case 3: panel_rows(3, xm, ldx, wt, ldw, bias, om, ldo, K, cols, prefetch); break;
            case 2: panel_rows(2, xm, ldx, wt, ldw, bias, om, ldo, K, cols, prefetch); break;
            default: panel_rows(1, xm, ldx, wt, ldw, bias, om, ldo, K, cols, prefetch); break;
        }
    }
}

/* out[M, N] (row stride ldo) = x[M, K] (row stride ldx) @ W^T + bias[N] (or NULL), on up to `threads`
 * OpenMP threads. Column panel p of W^T (columns 16p..16p+15) starts at wt + p * panel_stride and its
 * row k at k * ldw from there: W^T itself is ldw = N, panel_stride = 16; a panel-major copy
 * ([N/16][K][16]) is ldw = 16, panel_stride = 16 K. */
void batchlm_gemm_f32(const float *x, long ldx, const float *wt, long ldw, long panel_stride,
                      const float *bias, float *out, long ldo, long M, long N, long K, int threads) {
    const long panels = (N + PANEL - 1) / PANEL;
    if (threads < 1) threads = 1;
    if (threads > panels) threads = (int)panels;
#pragma omp parallel num_threads(threads)
    {
        const long team = omp_get_num_threads();
        const long me = omp_get_thread_num();
        const long first = panels * me / team;
        const long last = panels * (me + 1) / team;
        for (long m = 0; m < M; m += ROW_BLOCK) {
            const long rows = M - m < ROW_BLOCK ? M - m : ROW_BLOCK;
            for (long p = first; p < last; p++) {
                const long n = p * PANEL;
                const long cols = N - n < PANEL ? N - n : PANEL;
                panel_all_rows(x + m * ldx, ldx, wt + p * panel_stride, ldw, bias ? bias + n : 0,
                               out + m * ldo + n, ldo, rows, K, cols);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------
 * Decode attention: one query token per request over its whole context in the paged cache, without
 * gathering the context into a padded copy first (what torch's path has to do). Work items are
 * requests; each reads its keys once (every query head, GQA groups sharing a KV head), takes the
 * softmax, then reads its values once.
 */

/* e^x for 8 floats: range reduction to 2^n e^r, |r| <= ln2 / 2, and a degree-6 polynomial (about 1 ulp). */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

static inline float hsum256(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

#ifndef PREFETCH_TOKENS
#define PREFETCH_TOKENS 4 /* how many tokens ahead the cache walk prefetches (DRAM latency x bandwidth) */
#endif

/* A paged KV cache holds float32 values or, with `half`, IEEE half ones (--kv-cache-dtype fp16): half
 * the bytes for a walk to read, widened 8 at a time by F16C as they are used. Offsets into a cache
 * count elements. */
static inline long kv_bytes(int half) { return half ? 2 : 4; }

/* Elements i..i+7 of a cache slice, as float32. */
static inline __m256 kv_load8(const void *slice, long i, int half) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)slice + i)));
    return _mm256_loadu_ps((const float *)slice + i);
}

/* 8 float32 values as half: rounded to nearest even and saturated at half's largest finite value, so
 * that one outsized key or value gives a wrong score rather than an infinity whose NaNs would spread
 * through the softmax (torch's path clamps the same way). */
static inline __m128i to_half8(__m256 x) {
    const __m256 limit = _mm256_set1_ps(65504.0f);
    /* min/max return their second operand when either is NaN: a NaN stays NaN, as torch's clamp keeps it. */
    x = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), limit), _mm256_min_ps(limit, x));
    return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
}

/* n float32 values (n a multiple of 8) into a cache slot, as half (to_half8) when `half`. */
static inline void kv_store(void *slot, const float *values, long n, int half) {
    if (!half) {
        memcpy(slot, values, sizeof(float) * (size_t)n);
        return;
    }
    for (long i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)((uint16_t *)slot + i), to_half8(_mm256_loadu_ps(values + i)));
}

/* Token t of a request in one paged cache: its keys (or values) of every KV head, contiguous. */
static inline const char *cached_token(const void *cache, const int32_t *table, long t, long block_size,
                                       long block_stride, long token_stride, int half) {
    const long blk = t / block_size;
    return (const char *)cache +
           ((long)table[blk] * block_stride + (t - blk * block_size) * token_stride) * kv_bytes(half);
}

/* Prefetch `bytes` bytes from p: one token's keys (or values) of one or every KV head. */
static inline void prefetch_token(const char *p, long bytes) {
    for (long f = 0; f < bytes; f += 64) _mm_prefetch(p + f, _MM_HINT_T0);
}

/* One KV head's slice of token t (`count` elements from element `offset`) in the cache, with the same
 * slice of token t + PREFETCH_TOKENS prefetched: what a walk that attends with one head reads. */
static inline const void *walk_head(const void *cache, const int32_t *table, long t, long length, long block_size,
                                    long block_stride, long token_stride, long offset, long count, int half) {
    const long bytes = kv_bytes(half);
    const char *slice = cached_token(cache, table, t, block_size, block_stride, token_stride, half) + offset * bytes;
    if (t + PREFETCH_TOKENS < length)
        prefetch_token(
            cached_token(cache, table, t + PREFETCH_TOKENS, block_size, block_stride, token_stride, half) +
                offset * bytes,
            count * bytes);
    return slice;
}

/* Token t of a request (length tokens) in the cache, every KV head, with token t + PREFETCH_TOKENS
 * prefetched. */
static inline const char *walk_token(const void *cache, const int32_t *table, long t, long length,
                                     long block_size, long block_stride, long token_stride, int half) {
    return walk_head(cache, table, t, length, block_size, block_stride, token_stride, 0, token_stride, half);
}

/* q . k * scale over D elements (a multiple of 8), k a cache slice. */
static inline float dot_cached(const float *q, const void *k, long D, float scale, int half) {
    __m256 sum = _mm256_mul_ps(_mm256_loadu_ps(q), kv_load8(k, 0, half));
    for (long d = 8; d < D; d += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), kv_load8(k, d, half), sum);
    return hsum256(sum) * scale;
}

/* out += p * v over D elements (a multiple of 8), v a cache slice. */
static inline void add_cached(float *out, const void *v, float p, long D, int half) {
    const __m256 pv = _mm256_set1_ps(p);
    for (long d = 0; d < D; d += 8)
        _mm256_storeu_ps(out + d, _mm256_fmadd_ps(pv, kv_load8(v, d, half), _mm256_loadu_ps(out + d)));
}

/* One request, every head, over its tokens first..length-1 (first > 0 on a sliding-window layer). The
 * cache keeps a block's tokens (all KV heads) contiguous, so walking the request's blocks in order reads
 * memory sequentially; the next token is prefetched while the current one is used. Scores become
 * cap * tanh(score / cap) when cap > 0. With `sinks` (one logit a head, or NULL), head h's sink joins
 * its softmax as one more score, never capped, whose weight goes to no value. scores: heads * length
 * floats; acc: heads * D floats (scratch). D is a multiple of 8. */
static void decode_request(const float *q, const void *k_cache, const void *v_cache, const int32_t *table,
                           long first, long length, long block_size, long heads, long kv_heads, long D, float scale,
                           float cap, const float *sinks, int half, float *out, float *scores, float *acc) {
    const long group = heads / kv_heads;
    const long token_stride = kv_heads * D;
    const long block_stride = block_size * token_stride;
    const long head_bytes = D * kv_bytes(half);
    if (length <= 0) {
        for (long i = 0; i < heads * D; i++) out[i] = 0.0f;
        return;
    }
    for (long t = first; t < length; t++) {
        const char *token = walk_token(k_cache, table, t, length, block_size, block_stride, token_stride, half);
        for (long h = 0; h < heads; h++) {
            const float score = dot_cached(q + h * D, token + (h / group) * head_bytes, D, scale, half);
            scores[h * length + t] = cap > 0.0f ? cap * tanhf(score / cap) : score;
        }
    }
    for (long h = 0; h < heads; h++) {
        float *sh = scores + h * length;
        /* The sink starts the max, so no weight (the sink's included) can exceed 1. */
        float best = sinks ? sinks[h] : -FLT_MAX;
        for (long t = first; t < length; t++) best = sh[t] > best ? sh[t] : best;
        __m256 total = _mm256_setzero_ps();
        const __m256 shift = _mm256_set1_ps(best);
        long t = first;
        for (; t + 8 <= length; t += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sh + t), shift));
            _mm256_storeu_ps(sh + t, e);
            total = _mm256_add_ps(total, e);
        }
        float sum = hsum256(total);
        for (; t < length; t++) {
            sh[t] = _mm256_cvtss_f32(exp256(_mm256_set1_ps(sh[t] - best)));
            sum += sh[t];
        }
        if (sinks) sum += _mm256_cvtss_f32(exp256(_mm256_set1_ps(sinks[h] - best)));
        /* Normalise the weights now, so the value pass only accumulates. */
        const __m256 norm = _mm256_set1_ps(1.0f / sum);
        for (t = first; t + 8 <= length; t += 8) _mm256_storeu_ps(sh + t, _mm256_mul_ps(_mm256_loadu_ps(sh + t), norm));
        for (; t < length; t++) sh[t] /= sum;
    }
    for (long i = 0; i < heads * D; i++) acc[i] = 0.0f;
    for (long t = first; t < length; t++) {
        const char *token = walk_token(v_cache, table, t, length, block_size, block_stride, token_stride, half);
        for (long h = 0; h < heads; h++)
            add_cached(acc + h * D, token + (h / group) * head_bytes, scores[h * length + t], D, half);
    }
    for (long i = 0; i < heads * D; i++) out[i] = acc[i];
}

/* out[b, h, :] = softmax(q[b, h] . K_b^T * scale) V_b for requests b < B, where K_b, V_b are the first
 * seq_lens[b] tokens of request b in the paged caches ([num_blocks, block_size, kv_heads, D] each), only
 * the last `window` of them when window > 0, with scores soft-capped at `cap` when cap > 0 and, when
 * `sinks` is not NULL, sinks[h] one more (uncapped) score of head h's softmax that has no value.
 * q rows are q_row_stride apart with heads D apart; out is [B, heads, D] with rows out_row_stride apart.
 * The caches hold half values when `half`, else float32. Requests with an empty context get zeros.
 * Returns 0, or -1 if scratch memory could not be allocated. */
int batchlm_paged_decode(const float *q, long q_row_stride, const void *k_cache, const void *v_cache,
                         const int32_t *block_tables, long table_stride, const int32_t *seq_lens, float *out,
                         long out_row_stride, long B, long heads, long kv_heads, long D, long block_size, float scale,
                         int threads, long window, float cap, const float *sinks, int half) {
    long longest = 1;
    for (long b = 0; b < B; b++) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    if (threads < 1) threads = 1;
    if (threads > B) threads = (int)(B > 0 ? B : 1);
    const size_t per_thread = (size_t)heads * ((size_t)longest + (size_t)D);
    float *scratch = (float *)malloc(sizeof(float) * per_thread * (size_t)threads);
    if (!scratch) return -1;
#pragma omp parallel num_threads(threads)
    {
        float *scores = scratch + (size_t)omp_get_thread_num() * per_thread;
        float *acc = scores + (size_t)heads * (size_t)longest;
#pragma omp for schedule(dynamic, 1)
        for (long b = 0; b < B; b++) {
            float *o = out + b * out_row_stride;
            const long first = window > 0 && seq_lens[b] > window ? seq_lens[b] - window : 0;
            decode_request(q + b * q_row_stride, k_cache, v_cache, block_tables + b * table_stride, first,
                           seq_lens[b], block_size, heads, kv_heads, D, scale, cap, sinks, half, o, scores, acc);
        }
    }
    free(scratch);
    return 0;
}

/* The cache write of a step's tokens (keys and values after RoPE), in one pass: token t's `row` keys
 * (every KV head, contiguous; a multiple of 8) from keys + t * key_stride, and its values likewise, to
 * flat slot slots[t] of each cache (skipped when negative), as half when `half` (kv_store: rounded to
 * nearest even and saturated as torch's clamp-then-convert path does, so the two agree bit for bit).
 * Returns how many slots lay past the caches' `capacity` slots (those are not written). */
long batchlm_write_kv(void *k_cache, void *v_cache, const float *keys, long key_stride, const float *values,
                      long value_stride, const int64_t *slots, long n, long row, long capacity, int half,
                      int threads) {
    long outside = 0;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : outside)
    for (long t = 0; t < n; t++) {
        if (slots[t] < 0) continue;
        if (slots[t] >= capacity) {
            outside++;
            continue;
        }
        const long at = (long)slots[t] * row * kv_bytes(half);
        kv_store((char *)k_cache + at, keys + t * key_stride, row, half);
        kv_store((char *)v_cache + at, values + t * value_stride, row, half);
    }
    return outside;
}

/* RoPE in the NeoX "rotate half" form for n tokens of `heads` heads of D values: token t's heads from
 * x + t * x_stride (heads D apart) rotated by the cos | sin row positions[t] of `table` (rows
 * table_stride apart) into out + t * out_stride. Each product, then the difference or sum, is rounded
 * on its own (no fused multiply-add), as torch's mul, mul and sub/add are, so the results are
 * transformers' bit for bit. Returns how many positions lay past the table's `rows` (their tokens are
 * not written). */
__attribute__((optimize("fp-contract=off"))) long batchlm_rope(const float *x, long x_stride, float *out,
                                                                long out_stride, const float *table, long rows,
                                                                long table_stride, const int64_t *positions,
                                                                long n, long heads, long D, int threads) {
    const long half = D / 2, vectors = half / 8 * 8;
    long outside = 0;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : outside)
    for (long t = 0; t < n; t++) {
        if (positions[t] < 0 || positions[t] >= rows) {
            outside++;
            continue;
        }
        const float *cos_row = table + positions[t] * table_stride, *sin_row = cos_row + half;
        for (long h = 0; h < heads; h++) {
            const float *x1 = x + t * x_stride + h * D, *x2 = x1 + half;
            float *o1 = out + t * out_stride + h * D, *o2 = o1 + half;
            for (long i = 0; i < vectors; i += 8) {
                const __m256 c = _mm256_loadu_ps(cos_row + i), s = _mm256_loadu_ps(sin_row + i);
                const __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
                _mm256_storeu_ps(o1 + i, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
                _mm256_storeu_ps(o2 + i, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
            }
            for (long i = vectors; i < half; i++) {
                const float a = x1[i], b = x2[i], c = cos_row[i], s = sin_row[i];
                const float ac = a * c, bs = b * s, bc = b * c, as = a * s;
                o1[i] = ac - bs;
                o2[i] = bc + as;
            }
        }
    }
    return outside;
}

/* ---------------------------------------------------------------------------------------------------
 * Sampling: one draw per row from softmax(logits / temperature) by inverse CDF, given one uniform
 * u in [0, 1) per row. torch's CPU path races Exponential noise over the whole vocabulary (a float64
 * uniform and a log per token); this needs one uniform per row and one vectorized exp per token.
 * Rows with temperature 0 take the argmax. Logits of -inf (filtered tokens) get probability exactly 0.
 */

#define SAMPLE_BLOCK 256

/* e^x with e^x = 0 below float's range (so -inf gives exactly 0). */
static inline __m256 exp256_or_zero(__m256 x) {
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
    return _mm256_and_ps(exp256(x), live);
}

static long row_argmax(const float *row, long V) {
    long best = 0;
    for (long v = 1; v < V; v++)
        if (row[v] > row[best]) best = v;
    return best;
}

/* The first token of block j at which the running probability mass passes `remaining` (or, if
 * rounding keeps it from passing, the block's last token with a non-zero probability). */
static long walk_block(const float *row, long V, long j, float peak, float inv_t, double remaining) {
    const long start = j * SAMPLE_BLOCK, end = start + SAMPLE_BLOCK < V ? start + SAMPLE_BLOCK : V;
    double seen = 0.0;
    long last_live = start;
    for (long v = start; v < end; v++) {
        const float p = _mm256_cvtss_f32(exp256_or_zero(_mm256_set1_ps((row[v] - peak) * inv_t)));
        if (p <= 0.0f) continue;
        last_live = v;
        seen += p;
        if (seen > remaining) return v;
    }
    return last_live;
}

static long sample_row(const float *row, long V, float temperature, double u, double *block_sums) {
    float peak = row[0];
    for (long v = 1; v < V; v++) peak = row[v] > peak ? row[v] : peak;
    const float inv = 1.0f / temperature;
    const __m256 inv_t = _mm256_set1_ps(inv);
    const __m256 shift = _mm256_set1_ps(peak);
    const long blocks = (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    double total = 0.0;
    for (long j = 0; j < blocks; j++) {
        const long start = j * SAMPLE_BLOCK, end = start + SAMPLE_BLOCK < V ? start + SAMPLE_BLOCK : V;
        __m256 acc = _mm256_setzero_ps();
        long v = start;
        for (; v + 8 <= end; v += 8)
            acc = _mm256_add_ps(acc, exp256_or_zero(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(row + v), shift), inv_t)));
        float sum = hsum256(acc);
        for (; v < end; v++)
            sum += _mm256_cvtss_f32(exp256_or_zero(_mm256_set1_ps((row[v] - peak) * inv)));
        block_sums[j] = sum;
        total += sum;
    }
    const double target = u * total;
    double seen = 0.0;
    long last_live_block = -1;
    for (long j = 0; j < blocks; j++) {
        if (block_sums[j] <= 0.0) continue;
        last_live_block = j;
        if (seen + block_sums[j] <= target) {
            seen += block_sums[j];
            continue;
        }
        /* The draw falls in this block: walk it (same per-token values as the block sums). */
        return walk_block(row, V, j, peak, inv, target - seen);
    }
    /* Rounding put the target at the very end: the last token with a non-zero probability. */
    return last_live_block >= 0 ? walk_block(row, V, last_live_block, peak, inv, INFINITY) : row_argmax(row, V);
}

/* out[b] = a draw from softmax(logits[b] / temperature[b]) with uniform uniforms[b], or argmax where
 * temperature[b] <= 0. logits rows are ld apart. Returns 0, or -1 if scratch could not be allocated. */
int batchlm_sample_f32(const float *logits, long ld, long B, long V, const float *temperature, const double *uniforms,
                       int64_t *out, int threads) {
    const long blocks = (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
    if (threads < 1) threads = 1;
    if (threads > B) threads = (int)(B > 0 ? B : 1);
    double *scratch = (double *)malloc(sizeof(double) * (size_t)blocks * (size_t)threads);
    if (!scratch) return -1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (long b = 0; b < B; b++) {
        const float *row = logits + b * ld;
        double *block_sums = scratch + (size_t)omp_get_thread_num() * (size_t)blocks;
        out[b] = temperature[b] > 0.0f ? sample_row(row, V, temperature[b], uniforms[b], block_sums)
                                       : row_argmax(row, V);
    }
    free(scratch);
    return 0;
}
