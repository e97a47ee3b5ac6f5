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
 * gpt-oss's sinks, router bias and expert biases are NULL pointers for the other families, tested
 * once a head or a stage, never in a loop over tokens or columns.
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

/* One decoder layer's weights (packed as cpu_quant.py packs them) and its KV cache. Norm weights are
 * the factors the normed values are multiplied by (Gemma's 1 + weight). */
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
    const float *q_norm, *k_norm; /* [head_dim] norms of each query and key head (Qwen3, Gemma 3), or NULL */
    /* A mixture-of-experts layer: the router [experts, hidden] (float32) and each expert's packed
     * gate/up [2 * expert_inter, hidden] and down [hidden, expert_inter] weights, in place of the dense
     * MLP's; router NULL for a dense layer. */
    const float *router;
    const uint8_t *const *expert_gate_up;
    const int *expert_gate_up_layout;
    const uint8_t *const *expert_down;
    const int *expert_down_layout;
    const float *sinks; /* [heads]: each query head's sink logit, a score without a value (gpt-oss), or NULL */
    /* gpt-oss's experts: the router's bias [experts], each expert's gate/up bias [2 * expert_inter] and
     * the down biases [experts, hidden] (each row's routing-weighted sum of its experts' added once,
     * after theirs), or NULL. */
    const float *router_bias;
    const float *const *expert_gate_up_bias;
    const float *expert_down_bias;
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
    /* The experts' activation (EXPERT_SILU or EXPERT_CLAMPED_SWIGLU, cpu_decode_experts.c) and the
     * clamped SwiGLU's alpha and limit. */
    long expert_activation;
    float swiglu_alpha, swiglu_limit;
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

/* Per-thread scratch: the residual stream, the normed rows, the quantized activations of one matmul's
 * input, one head's attention scores, and a new key (rotated) and value as the cache holds them; for
 * experts, the rows of one expert ([B, hidden]), their SiLU * up ([B, expert_inter]) and the routing
 * (routing_longs). */
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

#include "cpu_decode_attend.c"

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

/* This thread's panels [first, last) of W against its quantized input: on AMX tiles where `isa`, the
 * rows and the code width allow (and the tile path's scratch could be had), else VNNI or AVX2. */
static void thread_panels(const uint8_t *w, int layout, const ThreadScratch *s, const float *bias, float *out,
                          long ldo, long B, long N, long K, long first, long last, int isa) {
    if (runs_amx(isa, B, layout) &&
        quant_gemm_panels_amx(w, layout, s->xq, s->xd, s->xb, bias, out, ldo, B, N, K, first, last) == 0)
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
#include "cpu_row_ops.c"

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
 * logits, a share of the routed experts' gate/up panels, a range of columns through every expert).
 * Every thread routes every row for itself from the shared logits. */
static void expert_mlp(const DecodeShape *shape, const DecodeLayer *layer, long B, const StepBuffers *buf,
                       const ThreadScratch *s, long me, long team, int isa, StageBarrier *barrier) {
    const long n = shape->hidden, E = shape->experts, I = shape->expert_inter;
    const ExpertWeights w = {layer->expert_gate_up,       layer->expert_gate_up_layout, layer->expert_down,
                             layer->expert_down_layout,   layer->expert_gate_up_bias,   (int)shape->expert_activation,
                             shape->swiglu_alpha,         shape->swiglu_limit};
    long first, last;
    share(E, me, team, &first, &last);
    router_logits(s->normed, B, n, layer->router, E, first, last, buf->logits);
    if (layer->router_bias) add_router_bias(buf->logits, B, E, layer->router_bias, first, last);
    stage_done(barrier, team);
    ExpertRuns runs;
    route_rows(buf->logits, B, E, shape->top_k, (int)shape->renormalize, s->routing, &runs);
    expert_gate_up_share(s->normed, n, I, &runs, &w, buf->gu, s->rows_k, s, me, team, isa);
    stage_done(barrier, team);
    expert_down_share(B, n, I, &runs, &w, buf->gu, s->act, s->rows_k, buf->out, s, me, team, isa);
    if (layer->expert_down_bias) {
        share((n + QPANEL - 1) / QPANEL, me, team, &first, &last); /* expert_down_share's columns */
        add_down_bias(buf->out, B, n, shape->top_k, &runs, layer->expert_down_bias, first * QPANEL,
                      last * QPANEL < n ? last * QPANEL : n, s->row);
    }
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
        for (long l = 0; l < shape->num_layers; l++)
            decode_layer(shape, layers + l, batch, &buf, &s, me, team, isa, &barrier);
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
