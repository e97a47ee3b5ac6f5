/* float32 kernels for x86-64 CPUs with AVX2 and FMA, built at run time by batchlm/kernels/cpu_native.py:
 * a GEMM over panel-packed weights (batchlm_gemm_f32) and decode attention straight from the paged KV
 * cache (batchlm_paged_decode_f32).
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
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

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
 * (request, KV head) pairs; each attends the query heads of its group (GQA) in three passes over the
 * context: scores (keys read once per query head, from cache after the first), softmax, values.
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

/* One (request, KV head): scores is scratch for `length` floats. D is a multiple of 8. */
static void decode_one(const float *q, long q_head_stride, const float *k_cache, const float *v_cache,
                       const int32_t *table, long length, long block_size, long kv_heads, long kv_head,
                       long group, long D, float scale, float *out, long out_head_stride, float *scores) {
    const long token_stride = kv_heads * D;
    const long block_stride = block_size * token_stride;
    if (length <= 0) {
        for (long h = 0; h < group; h++)
            for (long d = 0; d < D; d++) out[h * out_head_stride + d] = 0.0f;
        return;
    }
    for (long h = 0; h < group; h++) {
        const float *qh = q + h * q_head_stride;
        float best = -FLT_MAX;
        for (long t = 0; t < length; t++) {
            const float *k = k_cache + (long)table[t / block_size] * block_stride + (t % block_size) * token_stride +
                             kv_head * D;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(k));
            for (long d = 8; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(k + d), acc);
            const float s = hsum256(acc) * scale;
            scores[t] = s;
            best = s > best ? s : best;
        }
        __m256 total = _mm256_setzero_ps();
        const __m256 shift = _mm256_set1_ps(best);
        long t = 0;
        for (; t + 8 <= length; t += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + t), shift));
            _mm256_storeu_ps(scores + t, e);
            total = _mm256_add_ps(total, e);
        }
        float sum = hsum256(total);
        for (; t < length; t++) {
            __m256 e = exp256(_mm256_set1_ps(scores[t] - best));
            scores[t] = _mm256_cvtss_f32(e);
            sum += scores[t];
        }
        const float norm = 1.0f / sum;
        float *oh = out + h * out_head_stride;
        for (long d0 = 0; d0 < D; d0 += 64) {
            const long width = D - d0 < 64 ? D - d0 : 64;
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (long t2 = 0; t2 < length; t2++) {
                const float *v = v_cache + (long)table[t2 / block_size] * block_stride +
                                 (t2 % block_size) * token_stride + kv_head * D + d0;
                const __m256 p = _mm256_set1_ps(scores[t2]);
                for (int j = 0; j < 8; j++)
                    if (j * 8 < width) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + j * 8), acc[j]);
            }
            for (int j = 0; j < 8; j++)
                if (j * 8 < width) _mm256_storeu_ps(oh + d0 + j * 8, _mm256_mul_ps(acc[j], _mm256_set1_ps(norm)));
        }
    }
}

/* out[b, h, :] = softmax(q[b, h] . K_b^T * scale) V_b for requests b < B, where K_b, V_b are the first
 * seq_lens[b] tokens of request b in the paged caches ([num_blocks, block_size, kv_heads, D] each).
 * q rows are q_row_stride apart with heads D apart; out is [B, heads, D] with rows out_row_stride apart.
 * Requests with an empty context get zeros. Returns 0, or -1 if scratch memory could not be allocated. */
int batchlm_paged_decode_f32(const float *q, long q_row_stride, const float *k_cache, const float *v_cache,
                             const int32_t *block_tables, long table_stride, const int32_t *seq_lens,
                             float *out, long out_row_stride, long B, long heads, long kv_heads, long D,
                             long block_size, float scale, int threads) {
    const long group = heads / kv_heads;
    long longest = 1;
    for (long b = 0; b < B; b++) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    const long items = B * kv_heads;
    if (threads < 1) threads = 1;
    if (threads > items) threads = (int)(items > 0 ? items : 1);
    float *scratch = (float *)malloc(sizeof(float) * (size_t)longest * (size_t)threads);
    if (!scratch) return -1;
#pragma omp parallel num_threads(threads)
    {
        float *scores = scratch + (size_t)omp_get_thread_num() * (size_t)longest;
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < items; item++) {
            const long b = item / kv_heads, g = item % kv_heads;
            decode_one(q + b * q_row_stride + g * group * D, D, k_cache, v_cache, block_tables + b * table_stride,
                       seq_lens[b], block_size, kv_heads, g, group, D, scale, out + b * out_row_stride + g * group * D,
                       D, scores);
        }
    }
    free(scratch);
    return 0;
}
