/* A whole decode step of a Llama-style decoder in one call, for a few requests on x86-64 CPUs with
 * quantized weights: built at run time by batchlm/kernels/cpu_decode_stack.py.
 *
 * A decode step of a small model at one or a few requests is short on arithmetic: between its matmuls
 * each layer does a dozen small operations (norms, rotary, the KV-cache write, attention, SiLU, the
 * residual adds), and done as torch ops from Python they cost about as much as the matmuls. Here every
 * layer runs inside one OpenMP parallel region with no Python in between:
 *
 *     h += o_proj(attention(rope(qkv(rmsnorm(h)))))      (the new key and value written to the cache)
 *     h += down(silu(gate(rmsnorm(h))) * up(rmsnorm(h)))
 *
 * or, in a mixture-of-experts layer, h += the routed experts' weighted sum (cpu_decode_experts.c).
 *
 * Each thread takes a fixed share of every matmul's 16-row panels (gate and up panels in pairs, so
 * the SiLU product needs no exchange) and of the (request, KV group) attention items; threads meet
 * at one barrier after each of the five stages (one more for an experts' layer, one more when rows
 * share a request's context), a barrier that spins briefly before it sleeps (cpu_stage_barrier.c).
 * The small row-wise work a stage starts with (a norm, quantizing the activations, rotating a new
 * key, routing the rows) every thread does for itself rather than wait for one that did it.
 *
 * The matmuls and the activation quantization are those of cpu_quant_kernels.c, the exp and the
 * cache walk those of cpu_kernels.c (both compiled into this library).
 */
#include "cpu_kernels.c"
#include "cpu_quant_kernels.c"
#include "cpu_stage_barrier.c"

/* One decoder layer's weights (packed as cpu_quant.py packs them) and its KV cache. */
typedef struct {
    const float *input_norm, *post_norm;   /* [hidden]: before the attention, before the MLP */
    /* Gemma's norms of the attention's and the MLP's outputs before each residual add, or NULL. */
    const float *attn_out_norm, *mlp_out_norm;
    const float *cos_sin; /* [max_position, rotary_dim]: cos in the first half of a row, sin in the second */
    long window; /* a sliding-window layer attends to its rows' last `window` tokens; 0: to all */
    float softcap; /* Gemma 2: scores soft-capped to cap * tanh(score / cap); 0: not */
    PackedParts qkv, o, gate_up, down;
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias; /* or NULL */
    void *k_cache, *v_cache; /* [num_blocks, block_size, kv_heads, head_dim] each, float32 or half */
    const float *q_norm, *k_norm; /* [head_dim] RMSNorm weights of each query and key head (Qwen3), or NULL */
    /* A mixture-of-experts layer: the router [experts, hidden] (float32) and each expert's packed
     * gate/up [2 * expert_inter, hidden] and down [hidden, expert_inter] weights, in place of the dense
     * MLP's; router NULL for a dense layer. */
    const float *router;
    const uint8_t *const *expert_gate_up;
    const int *expert_gate_up_layout;
    const uint8_t *const *expert_down;
    const int *expert_down_layout;
} DecodeLayer;

/* The model's sizes. */
typedef struct {
    long hidden, heads, kv_heads, head_dim, intermediate, block_size, num_layers;
    long kv_half; /* the KV caches hold half values (else float32) */
    /* Mixture-of-experts layers: experts, chosen a row, each one's intermediate size, and
     * whether the chosen weights are rescaled to sum to 1 (all 0 where every layer is dense). */
    long experts, top_k, expert_inter, renormalize;
    long gelu; /* the dense MLP's gate: 0 SiLU, 1 GELU (tanh approximation) */
    long rotary_dim; /* the leading dimensions of each head that RoPE turns (head_dim, or fewer) */
    float eps, scale;
    const float *final_norm; /* [hidden] */
} DecodeShape;

/* One step's rows, each one new token. Rows of one request (a speculative verify chunk laid out as
 * decode rows) read each other's keys: `shared_context` != 0 then stores every row's key and value
 * before any row attends, at the cost of one more barrier per layer. */
typedef struct {
    long B;
    const int64_t *positions, *slots;
    const int32_t *block_tables, *seq_lens;
    long table_stride;
    long shared_context;
} DecodeBatch;

/* Per-thread scratch: the residual stream, the normed rows, the quantized activations of one matmul's input, one head's
 * attention scores, and a new key (rotated) and value as the cache holds them; for experts, the rows
 * of one expert ([B, hidden]), their SiLU * up ([B, expert_inter]) and the routing (routing_longs). */
typedef struct {
    float *h, *row; /* this thread's copy of the residual stream [B, hidden], a row's scratch [hidden] */
    float *normed, *scores;
    int8_t *xq;
    float *xd, *xb, *key, *value;
    float *rows_k, *act;
    long *routing;
} ThreadScratch;

static void rms_norm_rows(const float *x, const float *weight, float *out, long B, long n, float eps) {
    for (long b = 0; b < B; b++) {
        const float *row = x + b * n;
        __m256 sq = _mm256_setzero_ps();
        for (long i = 0; i < n; i += 8) sq = _mm256_fmadd_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(row + i), sq);
        const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum256(sq) / (float)n + eps));
        for (long i = 0; i < n; i += 8)
            _mm256_storeu_ps(out + b * n + i,
                             _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + i), inv), _mm256_loadu_ps(weight + i)));
    }
}

/* Rotate the first R dimensions of one head in place by the cos/sin row of its position (the NeoX
 * "rotate half" form); the rest of the head (partial rotary) stays as it is. */
static void rope_head(float *x, const float *cos_sin, long R) {
    const long half = R / 2;
    for (long i = 0; i < half; i++) {
        const float c = cos_sin[i], s = cos_sin[half + i];
        const float x1 = x[i], x2 = x[half + i];
        x[i] = x1 * c - x2 * s;
        x[half + i] = x2 * c + x1 * s;
    }
}

/* Row b's key and value of KV head g into the cache at the row's slot. */
static void store_slot(const DecodeShape *shape, const DecodeLayer *layer, const DecodeBatch *batch, long b, long g,
                       const float *key, const float *value) {
    const long D = shape->head_dim, at = (batch->slots[b] * shape->kv_heads + g) * D * kv_bytes((int)shape->kv_half);
    kv_store((char *)layer->k_cache + at, key, D, (int)shape->kv_half);
    kv_store((char *)layer->v_cache + at, value, D, (int)shape->kv_half);
}

/* Stage 2a for one (row b, KV head g): rotate its key and store the key and value at the row's slot. */
static void store_group(const DecodeShape *shape, const DecodeLayer *layer, const DecodeBatch *batch, float *qkv,
                        long b, long g) {
    const long D = shape->head_dim, H = shape->heads, G = shape->kv_heads;
    float *k = qkv + b * (H + 2 * G) * D + H * D + g * D, *v = k + G * D;
    rope_head(k, layer->cos_sin + batch->positions[b] * shape->rotary_dim, shape->rotary_dim);
    store_slot(shape, layer, batch, b, g, k, v);
}

/* x through half and back, in place: what a half cache would give back for it. */
static void round_through_half(float *x, long D) {
    for (long d = 0; d < D; d += 8) _mm256_storeu_ps(x + d, _mm256_cvtph_ps(to_half8(_mm256_loadu_ps(x + d))));
}

/* Row b's new key of KV head g, rotated, and its value into `key` and `value`, as the cache holds them
 * once stored (rounded when half): a thread attending with one of the group's query heads has them
 * without waiting for the thread that stores them, and attends as the cache-reading paths do. */
static void new_key_value(const DecodeShape *shape, const DecodeLayer *layer, const DecodeBatch *batch,
                          const float *qkv, long b, long g, float *key, float *value) {
    const long D = shape->head_dim, H = shape->heads, G = shape->kv_heads;
    const float *k = qkv + b * (H + 2 * G) * D + H * D + g * D;
    memcpy(key, k, sizeof(float) * (size_t)D);
    memcpy(value, k + G * D, sizeof(float) * (size_t)D);
    rope_head(key, layer->cos_sin + batch->positions[b] * shape->rotary_dim, shape->rotary_dim);
    if (shape->kv_half) {
        round_through_half(key, D);
        round_through_half(value, D);
    }
}

/* scores[0..length) -> their softmax. The exponentials go 8 at a time (lane by lane the same as one at
 * a time), the total is summed in order. */
static void softmax_in_place(float *scores, long length) {
    float best = -FLT_MAX, total = 0.0f;
    for (long t = 0; t < length; t++) best = scores[t] > best ? scores[t] : best;
    long t = 0;
    for (; t + 8 <= length; t += 8)
        _mm256_storeu_ps(scores + t, exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(best))));
    for (; t < length; t++) scores[t] = _mm256_cvtss_f32(exp256(_mm256_set1_ps(scores[t] - best)));
    for (t = 0; t < length; t++) total += scores[t];
    for (t = 0; t < length; t++) scores[t] /= total;
}

/* Stage 2b for row b's query heads [h0, h1) of one KV group: rotate them and attend over the row's
 * context (its last layer->window tokens on a sliding-window layer), walking the group's keys and
 * values once for all of them. With `key` (and `value`) given, the row's last token is read from them
 * rather than from the cache, which another thread may still be writing (new_key_value made them as
 * the cache holds them); else every token comes from the cache. scores: (h1 - h0) * length floats. */
static void attend_heads(const DecodeShape *shape, const DecodeLayer *layer, const DecodeBatch *batch, float *qkv,
                         float *attn, long b, long h0, long h1, float *scores, const float *key, const float *value) {
    const long D = shape->head_dim, H = shape->heads, G = shape->kv_heads, g = h0 / (H / G), n = h1 - h0;
    float *q = qkv + b * (H + 2 * G) * D + h0 * D; /* the heads' queries, D apart */
    const long token_stride = G * D, block_stride = shape->block_size * token_stride;
    const long length = batch->seq_lens[b], cached = key ? length - 1 : length;
    const long first = layer->window > 0 && length > layer->window ? length - layer->window : 0;
    const long span = length - first; /* scores[j * span + t - first]: query head h0 + j, token t */
    const int32_t *table = batch->block_tables + b * batch->table_stride;
    const int half = (int)shape->kv_half;
    const float *cos_sin = layer->cos_sin + batch->positions[b] * shape->rotary_dim;
    for (long j = 0; j < n; j++) rope_head(q + j * D, cos_sin, shape->rotary_dim);
    for (long t = first; t < cached; t++) {
        const void *k = walk_head(layer->k_cache, table, t, cached, shape->block_size, block_stride, token_stride,
                                  g * D, D, half);
        for (long j = 0; j < n; j++) scores[j * span + t - first] = dot_cached(q + j * D, k, D, shape->scale, half);
    }
    for (long j = 0; j < n; j++) {
        float *row = scores + j * span;
        if (key) row[span - 1] = dot_cached(q + j * D, key, D, shape->scale, 0);
        if (layer->softcap > 0.0f)
            for (long t = 0; t < span; t++) row[t] = layer->softcap * tanhf(row[t] / layer->softcap);
        softmax_in_place(row, span);
    }
    float *out = attn + b * H * D + h0 * D;
    for (long d = 0; d < n * D; d++) out[d] = 0.0f;
    for (long t = first; t < cached; t++) {
        const void *v = walk_head(layer->v_cache, table, t, cached, shape->block_size, block_stride, token_stride,
                                  g * D, D, half);
        for (long j = 0; j < n; j++) add_cached(out + j * D, v, scores[j * span + t - first], D, half);
    }
    if (value)
        for (long j = 0; j < n; j++) add_cached(out + j * D, value, scores[j * span + span - 1], D, 0);
}

/* Items of the attention stage: a (row, KV group) each, whose walk of the cache serves the group's
 * query heads together, unless the rows' groups are too few to share among the threads (B * kv_heads <
 * 2 * team), where each query head is an item of its own. */
static long attention_item_heads(const DecodeShape *shape, long B, long team) {
    return B * shape->kv_heads < 2 * team ? 1 : shape->heads / shape->kv_heads;
}

/* Stage 2 for this thread's items [first, last), `per_item` query heads each (attention_item_heads).
 * Rows of one request (shared context) had every key stored in a stage of its own; else the item
 * holding a group's first query head stores the group's new key and value, and every item attends
 * with its own copy of them. */
static void attend_items(const DecodeShape *shape, const DecodeLayer *layer, const DecodeBatch *batch, float *qkv,
                         float *attn, long first, long last, long per_item, const ThreadScratch *s) {
    const long H = shape->heads, group = H / shape->kv_heads, items_per_row = H / per_item;
    for (long item = first; item < last; item++) {
        const long b = item / items_per_row, h0 = (item % items_per_row) * per_item, g = h0 / group;
        if (batch->shared_context) {
            attend_heads(shape, layer, batch, qkv, attn, b, h0, h0 + per_item, s->scores, NULL, NULL);
            continue;
        }
        new_key_value(shape, layer, batch, qkv, b, g, s->key, s->value);
        if (h0 % group == 0) store_slot(shape, layer, batch, b, g, s->key, s->value);
        attend_heads(shape, layer, batch, qkv, attn, b, h0, h0 + per_item, s->scores, s->key, s->value);
    }
}

/* This thread's share [first, last) of `count` items. */
static inline void share(long count, long me, long team, long *first, long *last) {
    *first = count * me / team;
    *last = count * (me + 1) / team;
}

/* The first panel of w from which `bytes` of its K-input panels lie before (rounded to the nearest). */
static long panel_at(const PackedParts *w, long K, long bytes) {
    for (long i = 0; i < w->parts; i++) {
        const long size = panel_bytes(w->layout[i], K / QBLOCK), count = w->start[i + 1] - w->start[i];
        if (bytes < size * count) return w->start[i] + (bytes + size / 2) / size;
        bytes -= size * count;
    }
    return w->start[w->parts];
}

/* This thread's share [first, last) of w's panels, even in bytes read rather than in panels: the parts
 * of a weight differ in bytes a panel. */
static void share_bytes(const PackedParts *w, long K, long me, long team, long *first, long *last) {
    long total = 0;
    for (long i = 0; i < w->parts; i++) total += (w->start[i + 1] - w->start[i]) * panel_bytes(w->layout[i], K / QBLOCK);
    *first = panel_at(w, K, total * me / team);
    *last = panel_at(w, K, total * (me + 1) / team);
}

/* x [B, K] quantized into this thread's scratch (for the tile path, zero rows up to whole tiles). */
static void quantize_own(const float *x, long B, long K, const ThreadScratch *s, int isa) {
    batchlm_quantize_rows_q8(x, K, s->xq, s->xd, s->xb, B, K, 1);
    if (takes_amx(isa, B)) zero_tile_padding(s->xq, s->xd, s->xb, B, K);
}

/* This thread's panels [first, last) of W against its quantized input: on AMX tiles where `isa` and
 * the rows allow (and the tile path's scratch could be had), else VNNI or AVX2. */
static void thread_panels(const uint8_t *w, int layout, const ThreadScratch *s, const float *bias, float *out,
                          long ldo, long B, long N, long K, long first, long last, int isa) {
    if (takes_amx(isa, B) && quant_gemm_panels_amx(w, layout, s->xq, s->xd, s->xb, bias, out, ldo, B, N, K, first,
                                                   last) == 0)
        return;
    quant_gemm_panels(w, layout, s->xq, s->xd, s->xb, bias, out, ldo, B, N, K, first, last, isa != ISA_AVX2);
}

/* This thread's panels [first, last) of the whole weight w (N outputs, row stride ldo), each through
 * its part. */
static void thread_parts(const PackedParts *w, const ThreadScratch *s, const float *bias, float *out, long ldo,
                         long B, long N, long K, long first, long last, int isa) {
    for (long i = 0; i < w->parts; i++) {
        const long lo = first > w->start[i] ? first : w->start[i];
        const long hi = last < w->start[i + 1] ? last : w->start[i + 1];
        if (lo >= hi) continue;
        const long row = part_row(w, i);
        thread_panels(w->data[i], w->layout[i], s, bias ? bias + row : 0, out + row, ldo, B, part_rows(w, i, N), K,
                      lo - w->start[i], hi - w->start[i], isa);
    }
}

/* x @ W^T for this thread's panels of W, its input quantized by this thread. isa: as batchlm_quant_gemm
 * takes it (the scratch holds whole tiles' rows where it may be ISA_AMX). */
static void own_panels(const float *x, long B, long K, const PackedParts *w, const float *bias, float *out, long N,
                       long first, long last, const ThreadScratch *s, int isa) {
    quantize_own(x, B, K, s, isa);
    thread_parts(w, s, bias, out, N, B, N, K, first, last, isa);
}

/* The residual add at the end of a block: h[B, n] += out, or (Gemma) += rmsnorm(out) * norm. Every
 * thread keeps its own copy of h and adds every column (a few rows: cheaper than another barrier),
 * scratch [n] floats. */
static void add_rows(float *h, const float *out, const float *norm, long B, long n, float eps, float *scratch) {
    for (long b = 0; b < B; b++) {
        const float *o = out + b * n;
        if (norm) {
            rms_norm_rows(o, norm, scratch, 1, n, eps);
            o = scratch;
        }
        for (long c = 0; c < n; c++) h[b * n + c] += o[c];
    }
}

/* tanh(x) = 1 - 2 / (exp(2x) + 1): exact at the ends (exp overflowing to inf gives 1, to 0 gives -1). */
static inline __m256 tanh256(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 e = exp256(_mm256_add_ps(x, x));
    return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
}

/* GELU, tanh approximation: x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))). */
static inline __m256 gelu_tanh256(__m256 x) {
    const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                       _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x),
                                                       _mm256_mul_ps(x, x), x));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), tanh256(inner)));
}

static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

/* act[:, c] = gate(gu[:, c]) * gu[:, I + c] for this thread's columns, the gate SiLU or (gelu) GELU. */
static void gate_mul_columns(const float *gu, float *act, long B, long I, long first, long last, int gelu) {
    const long from = first * QPANEL, to = last * QPANEL < I ? last * QPANEL : I;
    for (long b = 0; b < B; b++) {
        const float *gate = gu + b * 2 * I, *up = gate + I;
        long c = from;
        for (; c + 8 <= to; c += 8) {
            const __m256 g = _mm256_loadu_ps(gate + c);
            __m256 gated;
            if (gelu) {
                gated = gelu_tanh256(g);
            } else {
                const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
                gated = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            }
            _mm256_storeu_ps(act + b * I + c, _mm256_mul_ps(gated, _mm256_loadu_ps(up + c)));
        }
        for (; c < to; c++) act[b * I + c] = (gelu ? gelu_tanh(gate[c]) : gate[c] / (1.0f + expf(-gate[c]))) * up[c];
    }
}

static void silu_mul_columns(const float *gu, float *act, long B, long I, long first, long last) {
    gate_mul_columns(gu, act, B, I, first, last, 0);
}

/* Shared buffers of one call: the router's logits [B, experts] where layers have experts. */
typedef struct {
    float *qkv, *attn, *out, *gu, *act, *logits;
} StepBuffers;

/* The end of a stage: every thread's share of it is done. OpenMP's barrier where the team is not the
 * size the stage barrier was made for. */
static inline void stage_done(StageBarrier *barrier, long team) {
    if (team == barrier->team) {
        stage_barrier_wait(barrier);
        return;
    }
#pragma omp barrier
}

/* A call's float and int8 scratch; nonzero (nothing allocated) when either cannot be had. */
static int alloc_scratch(size_t float_count, size_t code_count, float **floats, int8_t **codes) {
    *floats = (float *)malloc(sizeof(float) * float_count);
    *codes = (int8_t *)malloc(code_count);
    if (*floats && *codes) return 0;
    free(*floats);
    free(*codes);
    return -1;
}

#include "cpu_decode_experts.c"

/* logits[:, e] = x @ router[e] for this thread's experts [first, last) (float32 dot products; four rows
 * at a time share each load of the router's row, every row summed in the same order). */
static void router_logits(const float *x, long B, long n, const float *router, long E, long first, long last,
                          float *logits) {
    for (long e = first; e < last; e++) {
        const float *w = router + e * n;
        long b = 0;
        for (; b + 4 <= B; b += 4) {
            const float *row = x + b * n;
            __m256 sum[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (long i = 0; i < n; i += 8) {
                const __m256 weights = _mm256_loadu_ps(w + i);
                for (int r = 0; r < 4; r++) sum[r] = _mm256_fmadd_ps(_mm256_loadu_ps(row + r * n + i), weights, sum[r]);
            }
            for (int r = 0; r < 4; r++) logits[(b + r) * E + e] = hsum256(sum[r]);
        }
        for (; b < B; b++) {
            const float *row = x + b * n;
            __m256 sum = _mm256_setzero_ps();
            for (long i = 0; i < n; i += 8) sum = _mm256_fmadd_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(w + i), sum);
            logits[b * E + e] = hsum256(sum);
        }
    }
}

/* out = down(gate(x) * up(x)) for x the normed rows in s->normed: two stages. */
static void dense_mlp(const DecodeShape *shape, const DecodeLayer *layer, long B, const StepBuffers *buf,
                      const ThreadScratch *s, long me, long team, int isa, StageBarrier *barrier) {
    const long n = shape->hidden, I = shape->intermediate;
    long first, last;
    quantize_own(s->normed, B, n, s, isa);
    share(I / QPANEL, me, team, &first, &last);
    for (long half = 0; half < 2; half++)
        thread_parts(&layer->gate_up, s, layer->gate_up_bias, buf->gu, 2 * I, B, 2 * I, n, first + half * I / QPANEL,
                     last + half * I / QPANEL, isa);
    gate_mul_columns(buf->gu, buf->act, B, I, first, last, (int)shape->gelu);
    stage_done(barrier, team);
    share((n + QPANEL - 1) / QPANEL, me, team, &first, &last);
    own_panels(buf->act, B, I, &layer->down, layer->down_bias, buf->out, n, first, last, s, isa);
    stage_done(barrier, team);
}

/* out = the routed experts' weighted sum for the normed rows in s->normed: three stages (the router's
 * logits, a share of each expert's experts' gate/up panels, a range of columns through every expert).
 * Every thread routes every row for itself from the shared logits. */
static void expert_mlp(const DecodeShape *shape, const DecodeLayer *layer, long B, const StepBuffers *buf,
                       const ThreadScratch *s, long me, long team, int isa, StageBarrier *barrier) {
    const long n = shape->hidden, E = shape->experts, I = shape->expert_inter;
    const ExpertWeights w = {layer->expert_gate_up, layer->expert_gate_up_layout, layer->expert_down,
                             layer->expert_down_layout};
    long first, last;
    share(E, me, team, &first, &last);
    router_logits(s->normed, B, n, layer->router, E, first, last, buf->logits);
    stage_done(barrier, team);
    ExpertRuns runs;
    route_rows(buf->logits, B, E, shape->top_k, (int)shape->renormalize, s->routing, &runs);
    expert_gate_up_share(s->normed, n, I, &runs, &w, buf->gu, s->rows_k, s, me, team, isa);
    stage_done(barrier, team);
    expert_down_share(B, n, I, &runs, &w, buf->gu, s->act, s->rows_k, buf->out, s, me, team, isa);
    stage_done(barrier, team);
}

/* One layer over this thread's copy of the residual stream, s->h. */
static void decode_layer(const DecodeShape *shape, const DecodeLayer *layer, const DecodeBatch *batch,
                         const StepBuffers *buf, const ThreadScratch *s, long me, long team, int isa,
                         StageBarrier *barrier) {
    float *h = s->h;
    const long B = batch->B, n = shape->hidden, D = shape->head_dim;
    const long qkv_n = (shape->heads + 2 * shape->kv_heads) * D, attn_n = shape->heads * D;
    long first, last;
    rms_norm_rows(h, layer->input_norm, s->normed, B, n, shape->eps);
    share_bytes(&layer->qkv, n, me, team, &first, &last);
    own_panels(s->normed, B, n, &layer->qkv, layer->qkv_bias, buf->qkv, qkv_n, first, last, s, isa);
    stage_done(barrier, team);
    if (layer->q_norm) { /* each query and key head normed in place, before its rotation */
        const long normed_heads = shape->heads + shape->kv_heads;
        share(B * normed_heads, me, team, &first, &last);
        for (long item = first; item < last; item++) {
            const long b = item / normed_heads, j = item % normed_heads;
            float *head = buf->qkv + b * qkv_n + j * D;
            rms_norm_rows(head, j < shape->heads ? layer->q_norm : layer->k_norm, head, 1, D, shape->eps);
        }
        stage_done(barrier, team);
    }
    if (batch->shared_context) {
        share(B * shape->kv_heads, me, team, &first, &last);
        for (long item = first; item < last; item++)
            store_group(shape, layer, batch, buf->qkv, item / shape->kv_heads, item % shape->kv_heads);
        stage_done(barrier, team);
    }
    const long per_item = attention_item_heads(shape, B, team);
    share(B * shape->heads / per_item, me, team, &first, &last);
    attend_items(shape, layer, batch, buf->qkv, buf->attn, first, last, per_item, s);
    stage_done(barrier, team);
    share((n + QPANEL - 1) / QPANEL, me, team, &first, &last);
    own_panels(buf->attn, B, attn_n, &layer->o, layer->o_bias, buf->out, n, first, last, s, isa);
    stage_done(barrier, team);
    add_rows(h, buf->out, layer->attn_out_norm, B, n, shape->eps, s->row);
    rms_norm_rows(h, layer->post_norm, s->normed, B, n, shape->eps);
    if (layer->router)
        expert_mlp(shape, layer, B, buf, s, me, team, isa, barrier);
    else
        dense_mlp(shape, layer, B, buf, s, me, team, isa, barrier);
    add_rows(h, buf->out, layer->mlp_out_norm, B, n, shape->eps, s->row);
}

static inline long longest_of(long a, long b) { return a > b ? a : b; }

/* h[B, hidden]: the token embeddings in, the final norm of the residual stream out. Sizes must be
 * multiples of 32 (hidden, heads * head_dim, intermediate, expert_inter) and head_dim of 8; the Python
 * side checks. With `head` (packed like the layers' weights, head_n outputs) the LM head runs in the
 * same parallel region, logits[B, head_n] = final_norm(h) @ head^T, sparing a second region's wake-up.
 * waits[0] and waits[1] receive how many stage-barrier waits there were and how many of them slept.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int batchlm_decode_stack(const DecodeShape *shape, const DecodeLayer *layers, const DecodeBatch *batch, float *h,
                         const PackedParts *head, long head_n, float *logits, int threads, int isa,
                         long spin_ns, int *waits) {
    const long B = batch->B, n = shape->hidden, I = shape->intermediate, D = shape->head_dim;
    const long E = shape->experts, k = shape->top_k, I_e = shape->expert_inter;
    const long qkv_n = (shape->heads + 2 * shape->kv_heads) * D, attn_n = shape->heads * D;
    const long widest = longest_of(longest_of(I, I_e), longest_of(attn_n, n));
    long longest = 1;
    for (long b = 0; b < B; b++) longest = batch->seq_lens[b] > longest ? batch->seq_lens[b] : longest;
    if (threads < 1) threads = 1;
    const long gu_n = longest_of(B * 2 * I, B * k * 2 * I_e);
    const size_t shared = (size_t)(B * (qkv_n + attn_n + n + I) + gu_n + B * E);
    const size_t group = (size_t)(shape->heads / shape->kv_heads);
    /* Quantized activations hold whole tiles' rows where the tile path may run. */
    const long code_rows = takes_amx(isa, B) ? amx_rows(B) : B;
    const long blocks = code_rows * widest / QBLOCK;
    const size_t experts_own = E ? (size_t)(B * n + B * I_e) + 2 * (size_t)routing_longs(B, E, k) + 2 : 0;
    const size_t own = 2 * (size_t)B * (size_t)n + (size_t)n + group * (size_t)longest + 5 * (size_t)blocks +
                       2 * (size_t)D + experts_own + 64;
    const size_t own_codes = 2 * (size_t)code_rows * (size_t)widest;
    float *floats;
    int8_t *codes;
    if (alloc_scratch(shared + own * (size_t)threads, own_codes * (size_t)threads, &floats, &codes)) return -1;
    float *at = floats;
    StepBuffers buf;
    buf.qkv = at, at += B * qkv_n;
    buf.attn = at, at += B * attn_n;
    buf.out = at, at += B * n;
    buf.act = at, at += B * I;
    buf.gu = at, at += gu_n;
    buf.logits = at;
    StageBarrier barrier;
    stage_barrier_init(&barrier, threads, spin_ns);
#pragma omp parallel num_threads(threads)
    {
        const long me = omp_get_thread_num(), team = omp_get_num_threads();
        float *mine = floats + shared + own * (size_t)me;
        ThreadScratch s;
        s.h = mine, mine += B * n;
        s.row = mine, mine += n;
        s.normed = mine, mine += B * n;
        s.scores = mine, mine += group * longest;
        s.xd = mine, mine += 2 * blocks;
        s.xb = mine, mine += 3 * blocks;
        s.key = mine, mine += D;
        s.value = mine, mine += D;
        s.xq = codes + own_codes * (size_t)me;
        s.rows_k = E ? mine : NULL;
        s.act = E ? mine + B * n : NULL;
        s.routing = E ? (long *)(((uintptr_t)(mine + B * n + B * I_e) + 7) & ~(uintptr_t)7) : NULL;
        memcpy(s.h, h, sizeof(float) * (size_t)(B * n));
        for (long l = 0; l < shape->num_layers; l++) decode_layer(shape, layers + l, batch, &buf, &s, me, team, isa, &barrier);
        /* Every thread read h before the first layer's first barrier. */
        if (me == 0) memcpy(h, s.h, sizeof(float) * (size_t)(B * n));
        if (head) {
            long first, last;
            rms_norm_rows(s.h, shape->final_norm, s.normed, B, n, shape->eps);
            share((head_n + QPANEL - 1) / QPANEL, me, team, &first, &last);
            own_panels(s.normed, B, n, head, NULL, logits, head_n, first, last, &s, isa);
        }
    }
    waits[0] = atomic_load(&barrier.waits);
    waits[1] = atomic_load(&barrier.slept);
    float *normed = buf.out;
    rms_norm_rows(h, shape->final_norm, normed, B, n, shape->eps);
    memcpy(h, normed, sizeof(float) * (size_t)(B * n));
    free(floats);
    free(codes);
    return 0;
}
