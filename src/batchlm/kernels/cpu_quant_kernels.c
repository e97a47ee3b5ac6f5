/* Quantized-weight matmuls for x86-64 CPUs, built at run time by batchlm/kernels/cpu_quant.py.
 *
 * Weights stay quantized: every 32 consecutive inputs of an output row form a block of unsigned codes u
 * (8-bit "w8" or 4-bit "w4") with a float16 scale s and bias b, w = s * u + b. GGUF's Q8_0, Q4_0, Q4_1,
 * Q5_0, Q5_1 and Q4_K all map onto these two without loss (see quant_blocks.py).
 *
 * Activations are quantized per block of 32 to int8 twice: x ~ d * q + e * r, where q are the codes of
 * x (as llama.cpp's q8 activation blocks) and r those of what q left over, x - d * q. The second pass
 * makes the activations ~15-bit exact: one int8 pass alone flips near ties of a real model's next
 * token against float activations. A block's contribution to an output is two integer dot products:
 *     sum_k w_k x_k = s * (d * sum_k u_k q_k + e * sum_k u_k r_k) + b * (d * sum_k q_k + e * sum_k r_k).
 *
 * Layout: 16 output rows form a panel, one contiguous stream. Per 32-input block, a panel holds 64
 * bytes of 16 scales and 16 biases (float16), then the codes arranged so that each 32-bit lane of a
 * 64-byte vector is 4 consecutive codes of one row: w8 has 8 such vectors (k = 4g .. 4g + 3 in vector
 * g), w4 packs two into one (vector h: low nibbles k = 4h .., high nibbles k = 16 + 4h ..). A broadcast
 * of 4 activation codes then meets 16 rows in one u8 x s8 dot-product instruction (VNNI dpbusd), and a
 * block ends with 16 row sums in one register: no horizontal reductions. Several activation rows reuse
 * each weight block from registers (prefill); a decode step reads every weight once.
 *
 * Where every block's bias is -z times its scale for one power of two z (Q8_0, Q4_0, Q5_0: codes stored
 * plus a fixed zero point), no bias is stored and the kernels make each as s * -z: the same float the
 * stored half would give, so the same results. Such a panel holds its blocks' 16 scales each (32
 * bytes a block, padded to a whole cache line), then their codes, so the code vectors stay on cache
 * line boundaries. The `layout` argument says which: bit 0 set for 4-bit codes, bits 1-3 log2 z (0:
 * biases stored).
 *
 * Table panels (bit 4 besides bits 0 and 1-3: IQ4_NL, IQ4_XS, MXFP4) hold 4-bit indices where the
 * codes are 8-bit ones drawn from 16 values: a 64-byte head holds the 16 codes (then zeros), then a
 * symmetric 4-bit panel of indices. The kernels expand each 64 indices to their codes with one byte
 * shuffle and go on as with 8-bit codes, so the results are those of the 8-bit panel bit for bit,
 * from 4.5 bits a weight instead of 8.5.
 *
 * AVX-512 VNNI where the CPU has it (checked at run time), else AVX2 (maddubs; w8 codes are re-centred
 * to signed so the 16-bit pair sums cannot saturate). Where the CPU also has AMX (Intel's tile unit)
 * and the OS grants its state, matmuls of AMX_MIN_ROWS rows or more take it (of AMX_MIN_ROWS_W4 for 4-bit
 * codes): the same layout feeds its tiles.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define QPANEL 16
#define QBLOCK 32
#define SB_BYTES 64
#define W8_BYTES 512
#define W4_BYTES 256
#define QROWS 4
/* Activation rows taken over every panel before moving on: their codes stay in this core's cache. */
#define QROW_BLOCK 64
#ifndef QPREFETCH
#define QPREFETCH 2048 /* bytes of the weight stream fetched ahead of the block in use */
#endif
/* The matmul paths (the `isa` argument). */
#define ISA_AVX2 0
#define ISA_AVX512 1
#define ISA_AMX 2 /* AVX-512 VNNI below AMX_MIN_ROWS activation rows */
#define AMX_ROWS 8 /* activation rows per tile product (each row's two passes: 16 tile rows) */
#define AMX_MIN_ROWS 8 /* below one tile product's rows the VNNI path is faster */
/* 4-bit codes are unpacked to bytes a panel at a time for the tiles, which VNNI does not need: below
 * this many rows it stays the faster path for them (BENCHMARKS.md). */
#define AMX_MIN_ROWS_W4 16
#define AMX_AHEAD 2 /* blocks summed ahead of the one in the float epilogue */
#define AMX_ROW_BLOCK 256 /* activation rows whose codes stay in this core's cache while every panel passes */

typedef int32_t __attribute__((may_alias, aligned(1))) unaligned_i32;

#define LAYOUT_4BIT 1
#define LAYOUT_TABLE 16 /* with LAYOUT_4BIT: the nibbles index a table of 8-bit codes */
#define TABLE_BYTES 64  /* a table panel's head: its 16 codes, padded to a cache line */

static inline int layout_zero_log2(int layout) { return (layout >> 1) & 7; }

static inline int layout_table(int layout) { return (layout & LAYOUT_TABLE) != 0; }

/* Whether a block's codes are 4-bit values the dot products take as they are (not table indices). */
static inline int layout_w4_codes(int layout) { return (layout & LAYOUT_4BIT) && !layout_table(layout); }

static inline long code_bytes(int layout) { return (layout & LAYOUT_4BIT) ? W4_BYTES : W8_BYTES; }

/* A panel's scales with no biases stored: 16 halves a block, padded to whole cache lines. */
static inline long scale_rows_bytes(long Kb) { return (Kb * QPANEL * 2 + 63) & ~63L; }

static inline long panel_bytes(int layout, long Kb) {
    const long head = layout_table(layout) ? TABLE_BYTES : 0;
    return head + (layout_zero_log2(layout) ? scale_rows_bytes(Kb) + Kb * code_bytes(layout)
                                            : Kb * (SB_BYTES + code_bytes(layout)));
}

/* Where a panel's blocks keep their scales (each block's biases, where stored, follow its scales) and
 * codes: block kb's at scales + kb * scale_stride and codes + kb * code_stride. */
typedef struct {
    const uint8_t *scales, *codes;
    long scale_stride, code_stride;
} PanelStreams;

static inline PanelStreams panel_streams(const uint8_t *panel, int layout, long Kb) {
    PanelStreams p;
    if (layout_table(layout)) panel += TABLE_BYTES;
    p.scales = panel;
    if (layout_zero_log2(layout)) {
        p.scale_stride = QPANEL * 2;
        p.codes = panel + scale_rows_bytes(Kb);
        p.code_stride = code_bytes(layout);
    } else {
        p.scale_stride = p.code_stride = SB_BYTES + code_bytes(layout);
        p.codes = panel + SB_BYTES;
    }
    return p;
}

/* A weight packed as consecutive row parts, each in its own layout (a fused layer whose shards come in
 * different formats keeps each as it came): part i holds the whole's panels [start[i], start[i + 1])
 * at data[i]. A weight of one layout is one part. */
#define MAX_PARTS 3
typedef struct {
    const uint8_t *data[MAX_PARTS];
    int layout[MAX_PARTS];
    long start[MAX_PARTS + 1];
    long parts;
} PackedParts;

static inline PackedParts one_part(const uint8_t *w, int layout, long N) {
    PackedParts p;
    memset(&p, 0, sizeof p);
    p.data[0] = w;
    p.layout[0] = layout;
    p.start[1] = (N + QPANEL - 1) / QPANEL;
    p.parts = 1;
    return p;
}

/* Part i's first output row and its row count, of a weight of N outputs. */
static inline long part_row(const PackedParts *w, long i) { return w->start[i] * QPANEL; }
static inline long part_rows(const PackedParts *w, long i, long N) {
    const long end = w->start[i + 1] * QPANEL;
    return (end < N ? end : N) - part_row(w, i);
}

/* The 16 row biases of a panel block whose scales are s, as float (AVX-512 and AMX paths). */
#define BLOCK_BIASES_512(layout, sc, s)                                                          \
    (layout_zero_log2(layout) ? _mm512_mul_ps((s), _mm512_set1_ps(-(float)(1 << layout_zero_log2(layout)))) \
                              : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((sc) + 32))))

/* 1 when this CPU (and OS) runs the AVX-512 VNNI path, else 0. */
int batchlm_quant_has_avx512_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* ---------------------------------------------------------------------------------------------------
 * Activations: x[M, K] (row stride ldx) -> xq[M, K] int8 (row stride K), xd[M, K/32] the block scales
 * and xb[M, K/32] = scale * sum of the block's codes. K is a multiple of 32.
 */
static inline float hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline int hsum256_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* One pass: q = round(x * 127 / max|x|); returns d = max|x| / 127 and stores d * q in back. */
static float quantize_pass(const float *x, int8_t *q, float *back, int *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    const float m = hmax256(amax);
    const float inv = m > 0.0f ? 127.0f / m : 0.0f;
    const float d = m / 127.0f;
    __m256i c[4];
    for (int i = 0; i < 4; i++) {
        c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
        _mm256_storeu_ps(back + 8 * i, _mm256_mul_ps(_mm256_cvtepi32_ps(c[i]), _mm256_set1_ps(d)));
    }
    *sum = hsum256_epi32(_mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3])));
    /* packs work within 128-bit lanes; the permute puts the 32 codes back in order. */
    const __m256i w01 = _mm256_packs_epi32(c[0], c[1]);
    const __m256i w23 = _mm256_packs_epi32(c[2], c[3]);
    const __m256i b = _mm256_packs_epi16(w01, w23);
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return d;
}

/* Both passes of one block: codes q (pass 1) and r (pass 2), their scales d[0], d[1], and bsum =
 * d * sum(q) + e * sum(r). */
static void quantize_block(const float *x, int8_t *q, int8_t *r, float *d, float *bsum) {
    float back[QBLOCK], rest[QBLOCK];
    int sum_q, sum_r;
    d[0] = quantize_pass(x, q, back, &sum_q);
    for (int k = 0; k < QBLOCK; k++) rest[k] = x[k] - back[k];
    d[1] = quantize_pass(rest, r, back, &sum_r);
    *bsum = d[0] * (float)sum_q + d[1] * (float)sum_r;
}

/* x[M, K] (row stride ldx) -> xq[M, 2, K] int8 (each row's pass-1 codes, then its pass-2 codes),
 * xd[M, Kb, 2] the two scales of each block and xb[M, Kb] its bias term. K is a multiple of 32. */
static inline void quantize_row_block(const float *x, long ldx, int8_t *xq, float *xd, float *xb, long K, long i) {
    const long blocks = K / QBLOCK, m = i / blocks, kb = i % blocks;
    int8_t *codes = xq + 2 * m * K + kb * QBLOCK;
    quantize_block(x + m * ldx + kb * QBLOCK, codes, codes + K, xd + 2 * i, xb + i);
}

void batchlm_quantize_rows_q8(const float *x, long ldx, int8_t *xq, float *xd, float *xb, long M, long K,
                              int threads) {
    const long total = M * (K / QBLOCK);
    if (threads <= 1 || total < 64) {
        for (long i = 0; i < total; i++) quantize_row_block(x, ldx, xq, xd, xb, K, i);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < total; i++) quantize_row_block(x, ldx, xq, xd, xb, K, i);
}

/* ---------------------------------------------------------------------------------------------------
 * AVX-512 VNNI: R activation rows against one panel (all K/32 blocks).
 */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")))

/* One activation row's share of a block: acc + s * (d * dot + e * rest) + b * bsum, for the row's pass
 * scales xd[2 at], xd[2 at + 1] and bias term xb[at] (the VNNI and tile paths both, for the same bits). */
AVX512 static inline __attribute__((always_inline)) __m512 add_block(__m512 acc, __m512i dot, __m512i rest,
                                                                     const float *xd, const float *xb, long at,
                                                                     __m512 s, __m512 b) {
    const __m512 sums = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xd[2 * at]),
                                        _mm512_mul_ps(_mm512_cvtepi32_ps(rest), _mm512_set1_ps(xd[2 * at + 1])));
    acc = _mm512_fmadd_ps(sums, s, acc);
    return _mm512_fmadd_ps(b, _mm512_set1_ps(xb[at]), acc);
}

/* bits4, symmetric (no biases stored; `zero` is then -z in every lane) and table (4-bit indices into
 * `codes16`, the table in each 128-bit lane) are constants at each call, so that the block strides are
 * too. `panel` is past a table panel's head. */
AVX512 static inline __attribute__((always_inline)) void panel_rows_512(
    const int R, const int bits4, const int symmetric, const int table, const __m512 zero, const __m512i codes16,
    const uint8_t *panel, long Kb, const int8_t *xq, long K, const float *xd, const float *xb, const float *bias,
    float *out, long ldo, long cols) {
    const long code_stride = (bits4 ? W4_BYTES : W8_BYTES) + (symmetric ? 0 : SB_BYTES);
    const long scale_stride = symmetric ? QPANEL * 2 : code_stride;
    const uint8_t *const codes = panel + (symmetric ? scale_rows_bytes(Kb) : SB_BYTES);
    const __mmask16 mask = (__mmask16)((1u << cols) - 1u);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512 bias_v = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
    __m512 acc[QROWS];
    for (int r = 0; r < R; r++) acc[r] = bias_v;
    for (long kb = 0; kb < Kb; kb++) {
        const uint8_t *sc = panel + kb * scale_stride, *blk = codes + kb * code_stride;
        /* The weight stream runs across 4 KiB pages, where the hardware prefetcher stops: fetch ahead. */
        for (long line = 0; line < code_stride; line += 64) _mm_prefetch((const char *)blk + QPREFETCH + line, _MM_HINT_T0);
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
        const __m512 b = symmetric ? _mm512_mul_ps(s, zero) : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 32)));
        __m512i w[8];
        if (bits4) {
            for (int h = 0; h < 4; h++) {
                const __m512i v = _mm512_loadu_si512(blk + 64 * h);
                w[h] = _mm512_and_si512(v, low4);
                w[h + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                if (table) {
                    w[h] = _mm512_shuffle_epi8(codes16, w[h]);
                    w[h + 4] = _mm512_shuffle_epi8(codes16, w[h + 4]);
                }
            }
        } else {
            for (int g = 0; g < 8; g++) w[g] = _mm512_loadu_si512(blk + 64 * g);
        }
        for (int r = 0; r < R; r++) {
            const unaligned_i32 *x4 = (const unaligned_i32 *)(xq + 2 * r * K + kb * QBLOCK);
            const unaligned_i32 *r4 = (const unaligned_i32 *)(xq + (2 * r + 1) * K + kb * QBLOCK);
            __m512i dot = _mm512_setzero_si512(), rest = _mm512_setzero_si512();
            for (int g = 0; g < 8; g++) {
                dot = _mm512_dpbusd_epi32(dot, w[g], _mm512_set1_epi32(x4[g]));
                rest = _mm512_dpbusd_epi32(rest, w[g], _mm512_set1_epi32(r4[g]));
            }
            acc[r] = add_block(acc[r], dot, rest, xd, xb, r * Kb + kb, s, b);
        }
    }
    for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(out + r * ldo, mask, acc[r]);
}

AVX512 static inline __attribute__((always_inline)) void panel_all_rows_512_as(
    const int bits4, const int symmetric, const int table, const __m512 zero, const __m512i codes16,
    const uint8_t *panel, long Kb, const int8_t *xq, long K, const float *xd, const float *xb, const float *bias,
    float *out, long ldo, long M, long cols) {
    for (long m = 0; m < M; m += QROWS) {
        const long rows = M - m < QROWS ? M - m : QROWS;
        const int8_t *q = xq + 2 * m * K;
        const float *d = xd + 2 * m * Kb, *b = xb + m * Kb;
        float *o = out + m * ldo;
        switch (rows) {
            case 4: panel_rows_512(4, bits4, symmetric, table, zero, codes16, panel, Kb, q, K, d, b, bias, o, ldo, cols); break;
            case 3: panel_rows_512(3, bits4, symmetric, table, zero, codes16, panel, Kb, q, K, d, b, bias, o, ldo, cols); break;
            case 2: panel_rows_512(2, bits4, symmetric, table, zero, codes16, panel, Kb, q, K, d, b, bias, o, ldo, cols); break;
            default: panel_rows_512(1, bits4, symmetric, table, zero, codes16, panel, Kb, q, K, d, b, bias, o, ldo, cols); break;
        }
    }
}

AVX512 static void panel_all_rows_512(int layout, const uint8_t *panel, long Kb, const int8_t *xq, long K,
                                      const float *xd, const float *xb, const float *bias, float *out,
                                      long ldo, long M, long cols) {
    const int zero_log2 = layout_zero_log2(layout);
    const __m512 zero = _mm512_set1_ps(-(float)(1 << zero_log2));
    if (layout_table(layout)) { /* always symmetric: quant_panels packs no other */
        const __m512i codes16 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)panel));
        panel_all_rows_512_as(1, 1, 1, zero, codes16, panel + TABLE_BYTES, Kb, xq, K, xd, xb, bias, out, ldo, M, cols);
        return;
    }
    const __m512i none = _mm512_setzero_si512();
    if (layout & LAYOUT_4BIT) {
        if (zero_log2)
            panel_all_rows_512_as(1, 1, 0, zero, none, panel, Kb, xq, K, xd, xb, bias, out, ldo, M, cols);
        else
            panel_all_rows_512_as(1, 0, 0, zero, none, panel, Kb, xq, K, xd, xb, bias, out, ldo, M, cols);
    } else {
        if (zero_log2)
            panel_all_rows_512_as(0, 1, 0, zero, none, panel, Kb, xq, K, xd, xb, bias, out, ldo, M, cols);
        else
            panel_all_rows_512_as(0, 0, 0, zero, none, panel, Kb, xq, K, xd, xb, bias, out, ldo, M, cols);
    }
}

/* ---------------------------------------------------------------------------------------------------
 * AVX2: one activation row against one panel, as two halves of 8 output rows. maddubs adds pairs of
 * u8 x s8 products into int16; w8 codes (up to 255) are re-centred to signed (c - 128) and multiplied
 * through the sign trick, so each pair stays within 2 * 128 * 127.
 */
static inline __m256i dot_quad_avx2(__m256i w, __m256i x, int bits4) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (bits4) return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
    const __m256i centred = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(centred), _mm256_sign_epi8(x, centred));
    return _mm256_madd_epi16(pairs, ones);
}

static void panel_row_avx2(int layout, const uint8_t *panel, long Kb, long K, const int8_t *xq, const float *xd,
                           const float *xb, const float *bias, float *out, long cols) {
    const PanelStreams st = panel_streams(panel, layout, Kb);
    /* nibbles: 4-bit values in the stream; bits4: ones the products take as they are (else they are
     * table indices, expanded to 8-bit codes through the table in each 128-bit lane of codes16). */
    const int nibbles = layout & LAYOUT_4BIT, bits4 = layout_w4_codes(layout), zero_log2 = layout_zero_log2(layout);
    const __m256i codes16 = layout_table(layout) ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)panel))
                                                 : _mm256_setzero_si256();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    float result[QPANEL];
    for (int half = 0; half < 2; half++) {
        __m256 acc = _mm256_setzero_ps();
        for (long kb = 0; kb < Kb; kb++) {
            const uint8_t *sc = st.scales + kb * st.scale_stride, *blk = st.codes + kb * st.code_stride;
            if (half == 0)  /* the second half reads the panel again, from cache */
                for (long line = 0; line < st.code_stride; line += 64)
                    _mm_prefetch((const char *)blk + QPREFETCH + line, _MM_HINT_T0);
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 16 * half)));
            __m256 b = zero_log2 ? _mm256_mul_ps(s, _mm256_set1_ps(-(float)(1 << zero_log2)))
                                 : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 32 + 16 * half)));
            /* w8's signed products miss 128 * sum(q) per block: fold it into the bias. */
            if (!bits4) b = _mm256_fmadd_ps(s, _mm256_set1_ps(128.0f), b);
            const unaligned_i32 *x4 = (const unaligned_i32 *)(xq + kb * QBLOCK);
            const unaligned_i32 *r4 = (const unaligned_i32 *)(xq + K + kb * QBLOCK);
            __m256i dot = _mm256_setzero_si256(), rest = _mm256_setzero_si256();
            for (int g = 0; g < 8; g++) {
                __m256i w;
                if (nibbles) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 64 * (g & 3) + 32 * half));
                    w = g < 4 ? _mm256_and_si256(v, low4) : _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    if (!bits4) w = _mm256_shuffle_epi8(codes16, w);
                } else {
                    w = _mm256_loadu_si256((const __m256i *)(blk + 64 * g + 32 * half));
                }
                dot = _mm256_add_epi32(dot, dot_quad_avx2(w, _mm256_set1_epi32(x4[g]), bits4));
                rest = _mm256_add_epi32(rest, dot_quad_avx2(w, _mm256_set1_epi32(r4[g]), bits4));
            }
            const __m256 sums = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xd[2 * kb]),
                                                _mm256_mul_ps(_mm256_cvtepi32_ps(rest), _mm256_set1_ps(xd[2 * kb + 1])));
            acc = _mm256_fmadd_ps(sums, s, acc);
            acc = _mm256_fmadd_ps(b, _mm256_set1_ps(xb[kb]), acc);
        }
        _mm256_storeu_ps(result + 8 * half, acc);
    }
    for (long j = 0; j < cols; j++) out[j] = result[j] + (bias ? bias[j] : 0.0f);
}

/* ---------------------------------------------------------------------------------------------------
 * AMX: AMX_ROWS activation rows against one panel per tile product. xq holds each row's pass-1 codes,
 * then its pass-2 codes, so one tile of 16 rows x 32 signed bytes (row stride K) is both passes of 8
 * rows. It meets the block's weight codes (8 rows of 16 x 4 unsigned bytes: a panel block's code
 * vectors already lie as the tile product takes its second operand) in one TDPBSUD: the int32 sums
 * dpbsud gives. The float epilogue is the VNNI path's, operation for operation, so both paths give
 * the same bits. The tiles' sums reach the vector registers only through memory, and that epilogue
 * per block is what bounds the path: a block's tile product runs AMX_AHEAD blocks ahead of it.
 */
/* AMX intrinsics came with GCC 11 and clang 12; an older compiler builds the other paths alone. */
#if defined(__clang__)
#if __clang_major__ >= 12
#define BATCHLM_AMX 1
#endif
#elif defined(__GNUC__) && __GNUC__ >= 11
#define BATCHLM_AMX 1
#endif
#if defined(BATCHLM_AMX) && !defined(BATCHLM_NO_AMX)
#define AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")))

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Two sets of tiles, so that a block's tile product runs while the block before goes through the float
 * epilogue: set 0 is tiles 0 (sums), 1 (activation codes), 2 (weight codes); set 1 is tiles 3-5. */
AMX static void amx_configure(void) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int set = 0; set < 6; set += 3) {
        config.rows[set] = 2 * AMX_ROWS;
        config.colsb[set] = QPANEL * 4;
        config.rows[set + 1] = 2 * AMX_ROWS;
        config.colsb[set + 1] = QBLOCK;
        config.rows[set + 2] = QBLOCK / 4;
        config.colsb[set + 2] = QPANEL * 4;
    }
    _tile_loadconfig(&config);
}

/* Block kb's sums into `to` [8 rows x (pass 1, pass 2), 16] through tile set (C, A, B): the activation
 * tile's rows are xq's rows as they lie, each row's pass-1 codes, then its pass-2 codes. */
#define AMX_BLOCK_SUMS(C, A, B, kb, to)                              \
    do {                                                            \
        _tile_loadd(A, xq + (kb) * QBLOCK, K);                      \
        _tile_loadd(B, codes + (kb) * code_stride, QPANEL * 4);     \
        _tile_zero(C);                                              \
        _tile_dpbsud(C, A, B);                                      \
        _tile_stored(C, (to), QPANEL * 4);                          \
    } while (0)

/* Block kb's sums into its buffer of the ring, through the tile set of its parity. */
#define AMX_START(kb)                                                                       \
    do {                                                                                    \
        int32_t *to_ = sums + ((kb) % (AMX_AHEAD + 1)) * set_size;                          \
        if ((kb) & 1)                                                                       \
            AMX_BLOCK_SUMS(3, 4, 5, kb, to_);                                               \
        else                                                                                \
            AMX_BLOCK_SUMS(0, 1, 2, kb, to_);                                               \
    } while (0)

/* AMX_ROWS activation rows (xq, xd, xb at the first of them; rows past M are zero padding) against
 * one panel: block kb's weight codes at codes + kb * code_stride. `sums`: a ring of AMX_AHEAD + 1
 * blocks' sums, 256 int32 each. */
AMX static void panel_tile_amx(const uint8_t *panel, int layout, long Kb, const uint8_t *codes, long code_stride,
                               const int8_t *xq, long K, const float *xd, const float *xb, const float *bias,
                               float *out, long ldo, long rows, long cols, int32_t *sums) {
    const PanelStreams st = panel_streams(panel, layout, Kb);
    const long set_size = 2 * AMX_ROWS * QPANEL;
    const __mmask16 mask = (__mmask16)((1u << cols) - 1u);
    const __m512 bias_v = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
    __m512 acc[AMX_ROWS];
    for (int r = 0; r < AMX_ROWS; r++) acc[r] = bias_v;
    /* Blocks are summed AMX_AHEAD ahead of the epilogue. */
    for (long kb = 0; kb < AMX_AHEAD && kb < Kb; kb++) AMX_START(kb);
    for (long kb = 0; kb < Kb; kb++) {
        const long next = kb + AMX_AHEAD;
        const int32_t *block = sums + (kb % (AMX_AHEAD + 1)) * set_size;
        const uint8_t *sc = st.scales + kb * st.scale_stride;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
        const __m512 b = BLOCK_BIASES_512(layout, sc, s);
        for (int r = 0; r < AMX_ROWS; r++) {
            if (r == AMX_ROWS / 2 && next < Kb) AMX_START(next);
            const __m512i dot = _mm512_loadu_si512(block + 2 * r * QPANEL);
            const __m512i rest = _mm512_loadu_si512(block + (2 * r + 1) * QPANEL);
            acc[r] = add_block(acc[r], dot, rest, xd, xb, r * Kb + kb, s, b);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(out + r * ldo, mask, acc[r]);
}

/* A 4-bit panel's codes as the tile product reads them, 8 x 64 bytes a block (the 8-bit ones already are);
 * a table panel's indices expanded to their codes. */
AMX static void unpack_w4_panel(const uint8_t *panel, int layout, long Kb, uint8_t *codes) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int table = layout_table(layout);
    const __m512i codes16 = table ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)panel)) : low4;
    const PanelStreams st = panel_streams(panel, layout, Kb);
    for (long kb = 0; kb < Kb; kb++) {
        const uint8_t *blk = st.codes + kb * st.code_stride;
        uint8_t *to = codes + kb * W8_BYTES;
        for (int h = 0; h < 4; h++) {
            const __m512i v = _mm512_loadu_si512(blk + 64 * h);
            __m512i low = _mm512_and_si512(v, low4), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            if (table) {
                low = _mm512_shuffle_epi8(codes16, low);
                high = _mm512_shuffle_epi8(codes16, high);
            }
            _mm512_storeu_si512(to + 64 * h, low);
            _mm512_storeu_si512(to + 64 * (h + 4), high);
        }
    }
}

/* Per-thread scratch of the AMX path: unpacked 4-bit panel codes, then the tile sums. */
static __thread void *amx_scratch = 0;
static __thread size_t amx_scratch_bytes = 0;

/* quant_gemm_panels on the tile unit; xq, xd and xb hold M rounded up to AMX_ROWS rows (zero padding).
 * Returns -1 without writing when the scratch cannot be had. */
AMX static int quant_gemm_panels_amx(const uint8_t *w, int layout, const int8_t *xq, const float *xd,
                                     const float *xb, const float *bias, float *out, long ldo, long M, long N,
                                     long K, long first, long last) {
    const long Kb = K / QBLOCK;
    const long bytes = panel_bytes(layout, Kb);
    const int bits4 = layout & LAYOUT_4BIT;
    const size_t sums_bytes = (AMX_AHEAD + 1) * 2 * AMX_ROWS * QPANEL * sizeof(int32_t);
    const size_t need = (bits4 ? (size_t)Kb * W8_BYTES : 0) + sums_bytes + 64;
    if (need > amx_scratch_bytes) {
        free(amx_scratch);
        amx_scratch = aligned_alloc(64, (need + 63) & ~(size_t)63);
        amx_scratch_bytes = amx_scratch ? need : 0;
        if (!amx_scratch) return -1;
    }
    uint8_t *unpacked = (uint8_t *)amx_scratch;
    int32_t *sums = (int32_t *)(unpacked + (bits4 ? (size_t)Kb * W8_BYTES : 0));
    amx_configure();
    for (long m0 = 0; m0 < M; m0 += AMX_ROW_BLOCK) {
        const long block_rows = M - m0 < AMX_ROW_BLOCK ? M - m0 : AMX_ROW_BLOCK;
        for (long p = first; p < last; p++) {
            const long n = p * QPANEL;
            const long cols = N - n < QPANEL ? N - n : QPANEL;
            const uint8_t *panel = w + p * bytes;
            const PanelStreams st = panel_streams(panel, layout, Kb);
            const uint8_t *codes = st.codes;
            long code_stride = st.code_stride;
            if (bits4) {
                unpack_w4_panel(panel, layout, Kb, unpacked);
                codes = unpacked;
                code_stride = W8_BYTES;
            }
            for (long t = 0; t < block_rows; t += AMX_ROWS) {
                const long m = m0 + t, rows = M - m < AMX_ROWS ? M - m : AMX_ROWS;
                panel_tile_amx(panel, layout, Kb, codes, code_stride, xq + 2 * m * K, K, xd + 2 * m * Kb, xb + m * Kb,
                               bias ? bias + n : 0, out + m * ldo + n, ldo, rows, cols, sums);
            }
        }
    }
    _tile_release();
    return 0;
}
#else
/* A compiler without AMX intrinsics: no tile path (batchlm_quant_has_amx says 0, so none is asked for). */
static int quant_gemm_panels_amx(const uint8_t *w, int layout, const int8_t *xq, const float *xd, const float *xb,
                                 const float *bias, float *out, long ldo, long M, long N, long K, long first,
                                 long last) {
    (void)w, (void)layout, (void)xq, (void)xd, (void)xb, (void)bias, (void)out, (void)ldo, (void)M, (void)N,
        (void)K, (void)first, (void)last;
    return -1;
}
#endif

/* ---------------------------------------------------------------------------------------------------
 * Panels [first, last) of out[M, N] (row stride ldo) = x @ W^T (+ bias[N] or NULL), x given as
 * batchlm_quantize_rows_q8's output, W as ceil(N/16) panels of K/32 blocks. `avx512` picks the VNNI
 * path (only where batchlm_quant_has_avx512_vnni() said so). One thread's share of a GEMM.
 */
static void quant_gemm_panels(const uint8_t *w, int layout, const int8_t *xq, const float *xd, const float *xb,
                              const float *bias, float *out, long ldo, long M, long N, long K, long first,
                              long last, int avx512) {
    const long Kb = K / QBLOCK;
    const long bytes = panel_bytes(layout, Kb);
    for (long m0 = 0; m0 < M; m0 += QROW_BLOCK) {
        const long rows = M - m0 < QROW_BLOCK ? M - m0 : QROW_BLOCK;
        for (long p = first; p < last; p++) {
            const long n = p * QPANEL;
            const long cols = N - n < QPANEL ? N - n : QPANEL;
            const uint8_t *panel = w + p * bytes;
            const float *bias_p = bias ? bias + n : 0;
            if (avx512) {
                panel_all_rows_512(layout, panel, Kb, xq + 2 * m0 * K, K, xd + 2 * m0 * Kb, xb + m0 * Kb, bias_p,
                                   out + m0 * ldo + n, ldo, rows, cols);
                continue;
            }
            for (long m = m0; m < m0 + rows; m++)
                panel_row_avx2(layout, panel, Kb, K, xq + 2 * m * K, xd + 2 * m * Kb, xb + m * Kb, bias_p,
                               out + m * ldo + n, cols);
        }
    }
}

/* 1 when this CPU has AMX-INT8 besides AVX-512 VNNI and the OS lets this process use the tiles, else 0.
 * Linux hands the tile state only to a process that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XTILEDATA), once; the grant covers its threads. */
int batchlm_quant_has_amx(void) {
#if defined(__linux__) && defined(SYS_arch_prctl) && defined(AMX)
    unsigned a, b, c, d;
    if (!batchlm_quant_has_avx512_vnni() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 24) & 1u) || !((d >> 25) & 1u)) return 0; /* AMX-TILE, AMX-INT8 */
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    return 0;
#endif
}

/* Whether a GEMM of M activation rows may run on the tile unit (its activations are then padded to
 * whole tiles), and whether one of weights in `layout` does. */
static inline int takes_amx(int isa, long M) { return isa == ISA_AMX && M >= AMX_MIN_ROWS; }
static inline int runs_amx(int isa, long M, int layout) {
    return takes_amx(isa, M) && M >= ((layout & LAYOUT_4BIT) ? AMX_MIN_ROWS_W4 : AMX_MIN_ROWS);
}

/* M rounded up to whole tiles: the rows the tile path reads. */
static inline long amx_rows(long M) { return (M + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS; }

/* Zero the rows past M of quantized activations (xq[rows, 2, K], xd[rows, K/32, 2], xb[rows, K/32])
 * up to whole tiles, which the tile path reads along with the real ones. */
static void zero_tile_padding(int8_t *xq, float *xd, float *xb, long M, long K) {
    const long pad = amx_rows(M) - M, Kb = K / QBLOCK;
    if (pad <= 0) return;
    memset(xq + 2 * M * K, 0, 2 * (size_t)pad * K);
    memset(xd + 2 * M * Kb, 0, 2 * (size_t)pad * Kb * sizeof(float));
    memset(xb + M * Kb, 0, (size_t)pad * Kb * sizeof(float));
}

/* The whole GEMM; threads split the panels. isa: ISA_AVX2, ISA_AVX512 or ISA_AMX (as the CPU allows);
 * where the AMX path runs, xq, xd and xb hold M rounded up to AMX_ROWS rows, the extra rows zero. Returns
 * -1 when a thread's scratch memory could not be had (the output is then incomplete). */
int batchlm_quant_gemm(const uint8_t *w, int layout, const int8_t *xq, const float *xd, const float *xb,
                       const float *bias, float *out, long ldo, long M, long N, long K, int threads, int isa) {
    const long panels = (N + QPANEL - 1) / QPANEL;
    const int amx = runs_amx(isa, M, layout);
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads > panels) threads = (int)panels;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const long team = omp_get_num_threads(), me = omp_get_thread_num();
        const long first = panels * me / team, last = panels * (me + 1) / team;
        if (amx)
            failed |= quant_gemm_panels_amx(w, layout, xq, xd, xb, bias, out, ldo, M, N, K, first, last) != 0;
        else
            quant_gemm_panels(w, layout, xq, xd, xb, bias, out, ldo, M, N, K, first, last, isa != ISA_AVX2);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------
 * Rows of W in float32 (an embedding lookup on the quantized table): out[t, :] = W[ids[t], :].
 */
void batchlm_quant_rows(const uint8_t *w, int layout, const int64_t *ids, long T, float *out, long ldo, long K) {
    const long Kb = K / QBLOCK;
    const long bytes = panel_bytes(layout, Kb);
    const int bits4 = layout & LAYOUT_4BIT, zero_log2 = layout_zero_log2(layout);
    for (long t = 0; t < T; t++) {
        const long n = ids[t], j = n % QPANEL;
        const uint8_t *panel = w + (n / QPANEL) * bytes;
        const PanelStreams st = panel_streams(panel, layout, Kb);
        float *o = out + t * ldo;
        for (long kb = 0; kb < Kb; kb++) {
            const uint8_t *sc = st.scales + kb * st.scale_stride;
            uint16_t half_s, half_b = 0;
            memcpy(&half_s, sc + 2 * j, 2);
            if (!zero_log2) memcpy(&half_b, sc + 32 + 2 * j, 2);
            const float s = _cvtsh_ss(half_s);
            const float b = zero_log2 ? s * -(float)(1 << zero_log2) : _cvtsh_ss(half_b);
            const uint8_t *codes = st.codes + kb * st.code_stride + 4 * j;
            for (int k = 0; k < QBLOCK; k++) {
                int u;
                if (bits4)
                    u = k < 16 ? codes[64 * (k / 4) + k % 4] & 15 : codes[64 * ((k - 16) / 4) + k % 4] >> 4;
                else
                    u = codes[64 * (k / 4) + k % 4];
                if (layout_table(layout)) u = panel[u]; /* the head's codes */
                o[kb * QBLOCK + k] = s * (float)u + b;
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------
 * The whole linear in one call (one crossing from Python per layer): quantize x[M, K] (row stride ldx)
 * into scratch owned by the calling thread, then batchlm_quant_gemm for each part of the weight.
 */
static __thread void *scratch = 0;
static __thread size_t scratch_bytes = 0;

int batchlm_quant_linear(const float *x, long ldx, const PackedParts *w, const float *bias, float *out, long M,
                         long N, long K, int threads, int isa) {
    const long Kb = K / QBLOCK;
    const long rows = takes_amx(isa, M) ? amx_rows(M) : M;
    const size_t codes = 2 * (size_t)rows * K, need = codes + 3 * (size_t)rows * Kb * sizeof(float) + 64;
    if (need > scratch_bytes) {
        free(scratch);
        scratch = malloc(need);
        scratch_bytes = scratch ? need : 0;
        if (!scratch) return -1;
    }
    int8_t *xq = (int8_t *)scratch;
    float *xd = (float *)(((uintptr_t)scratch + codes + 63) & ~(uintptr_t)63);
    float *xb = xd + 2 * rows * Kb;
    batchlm_quantize_rows_q8(x, ldx, xq, xd, xb, M, K, threads);
    if (rows > M) zero_tile_padding(xq, xd, xb, M, K);
    int failed = 0;
    for (long i = 0; i < w->parts; i++) {
        const long row = part_row(w, i);
        failed |= batchlm_quant_gemm(w->data[i], w->layout[i], xq, xd, xb, bias ? bias + row : 0, out + row, N, M,
                                     part_rows(w, i, N), K, threads, isa);
    }
    return failed;
}

/* Q6_K super-blocks as Q8_0 blocks, for the layers that read Q8_0 (quant_blocks.py reads Q6_K no other
 * way). A super-block is 256 values: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales of
 * 16 values each and a float16 d; a value is (d * scale) * (q - 32) in float32, then each 32 become
 * Q8_0 as from_dense_q8 makes them: step max|v| / 127, codes floor(|v / step| + 0.5) with the sign,
 * plus 128, and the step as float16. The same operations in the same order as gguf's dequantization
 * and our numpy quantizer, so the codes and steps equal theirs bit for bit (tests/test_quant_blocks.py). */
__attribute__((optimize("fp-contract=off"))) static void q6_k_block_to_q8(const uint8_t *block, uint8_t *codes,
                                                                           uint16_t *steps) {
    const uint8_t *ql = block, *qh = block + 128;
    const int8_t *sc = (const int8_t *)(block + 192);
    const float d = _cvtsh_ss((uint16_t)(block[208] | (block[209] << 8)));
    float v[256];
    for (int half = 0; half < 2; half++) {
        const uint8_t *l = ql + 64 * half, *h = qh + 32 * half;
        const int8_t *s = sc + 8 * half;
        float *out = v + 128 * half;
        for (int i = 0; i < 32; i++) {
            const int is = i / 16;
            out[i] = (d * (float)s[is]) * (float)((int)((l[i] & 0xF) | ((h[i] & 3) << 4)) - 32);
            out[i + 32] = (d * (float)s[is + 2]) * (float)((int)((l[i + 32] & 0xF) | (((h[i] >> 2) & 3) << 4)) - 32);
            out[i + 64] = (d * (float)s[is + 4]) * (float)((int)((l[i] >> 4) | (((h[i] >> 4) & 3) << 4)) - 32);
            out[i + 96] = (d * (float)s[is + 6]) * (float)((int)((l[i + 32] >> 4) | (((h[i] >> 6) & 3) << 4)) - 32);
        }
    }
    for (int b = 0; b < 256 / QBLOCK; b++) {
        const float *x = v + QBLOCK * b;
        float amax = 0.0f;
        for (int i = 0; i < QBLOCK; i++) {
            const float a = x[i] < 0.0f ? -x[i] : x[i];
            amax = a > amax ? a : amax;
        }
        const float step = amax / 127.0f;
        const float inverse = step > 0.0f ? 1.0f / step : 0.0f;
        for (int i = 0; i < QBLOCK; i++) {
            /* 128 + sign * magnitude: copysign gives +-0 for a zero, and 128 +- 0 is 128, as numpy's sign(0) = 0 */
            const float scaled = x[i] * inverse;
            codes[QBLOCK * b + i] = (uint8_t)(int)(128.0f + copysignf(floorf(fabsf(scaled) + 0.5f), scaled));
        }
        steps[b] = _cvtss_sh(step, _MM_FROUND_TO_NEAREST_INT);
    }
}

void batchlm_q6_k_to_q8(const uint8_t *blocks, long n_blocks, uint8_t *codes, uint16_t *steps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < n_blocks; b++) q6_k_block_to_q8(blocks + 210 * b, codes + 256 * b, steps + 8 * b);
}
