/* Mixture-of-experts layers on packed quantized weights, #included by cpu_decode_stack.c after its
 * helpers: the router's logits and the routing of a step's rows, the two stages that run the routed
 * experts (every thread a share of the experts' gate/up panels; after one barrier, every thread a
 * range of output columns through every expert), and batchlm_moe_experts, which runs those stages in
 * a parallel region of its own for the layer-by-layer path. The fused decode stack runs the same
 * stages inside its region.
 */

/* A step's routed slots grouped by expert: slots [starts[i], starts[i + 1]) go to expert ids[i] (or
 * the i-th expert listed, where ids is NULL), slot s carrying row tokens[s] with routing weight
 * weights[s]. */
typedef struct {
    long active;
    const long *ids, *starts;
    const int64_t *tokens;
    const float *weights;
    /* route_rows' own: row b's j-th choice (best first) chosen[b * k + j], its weight picked[b * k + j]. */
    const long *chosen;
    const float *picked;
} ExpertRuns;

/* The experts' activation of [gate | up] (batchlm_moe_experts' `activation`). */
enum { EXPERT_SILU = 0, EXPERT_CLAMPED_SWIGLU = 1 };

/* Experts' packed weights: gate_up[e] [2I, K] (gate rows, then up rows) and down[e] [K, I]; with
 * gate_up_bias (else NULL) each expert's [2I] bias after its gate/up product. The activation: SiLU
 * (the zeros a struct initializer leaves) or gpt-oss's clamped SwiGLU with its alpha and limit. */
typedef struct {
    const uint8_t *const *gate_up;
    const int *gate_up_layout;
    const uint8_t *const *down;
    const int *down_layout;
    const float *const *gate_up_bias;
    int activation;
    float alpha, limit;
} ExpertWeights;

static inline long run_expert(const ExpertRuns *runs, long i) { return runs->ids ? runs->ids[i] : i; }

static inline long most_rows_of(const ExpertRuns *runs) {
    long most = 1;
    for (long i = 0; i < runs->active; i++)
        most = runs->starts[i + 1] - runs->starts[i] > most ? runs->starts[i + 1] - runs->starts[i] : most;
    return most;
}

/* gu[:, c] += bias[c] for the columns [from, to) of `rows` rows of 2I: the bias after the product, the
 * float add of the expert-by-expert path. */
static void add_gate_up_bias(float *gu, long rows, long I, const float *bias, long from, long to) {
    for (long r = 0; r < rows; r++)
        for (long c = from; c < to; c++) gu[r * 2 * I + c] += bias[c];
}

/* Stage 1, this thread's share of every routed expert's gate/up panels: gu [slots, 2I] gets each slot's
 * gate/up outputs (plus the expert's bias, where it has one). x [rows, K] holds the rows the slots
 * name; rows_k [most rows, K] is scratch. */
static void expert_gate_up_share(const float *x, long K, long I, const ExpertRuns *runs, const ExpertWeights *w,
                                 float *gu, float *rows_k, const ThreadScratch *s, long me, long team, int isa) {
    const long gate_panels = (2 * I + QPANEL - 1) / QPANEL;
    long first, last;
    share(runs->active * gate_panels, me, team, &first, &last);
    for (long i = 0; i < runs->active; i++) {
        const long lo = first > i * gate_panels ? first : i * gate_panels;
        const long hi = last < (i + 1) * gate_panels ? last : (i + 1) * gate_panels;
        if (lo >= hi) continue;
        const long rows = runs->starts[i + 1] - runs->starts[i], e = run_expert(runs, i);
        for (long r = 0; r < rows; r++)
            memcpy(rows_k + r * K, x + runs->tokens[runs->starts[i] + r] * K, sizeof(float) * (size_t)K);
        const PackedParts expert = one_part(w->gate_up[e], w->gate_up_layout[e], 2 * I);
        float *expert_gu = gu + runs->starts[i] * 2 * I;
        own_panels(rows_k, rows, K, &expert, NULL, expert_gu, 2 * I, lo - i * gate_panels, hi - i * gate_panels,
                   s, isa);
        if (w->gate_up_bias) {
            const long to = (hi - i * gate_panels) * QPANEL;
            add_gate_up_bias(expert_gu, rows, I, w->gate_up_bias[e], (lo - i * gate_panels) * QPANEL,
                             to < 2 * I ? to : 2 * I);
        }
    }
}

/* gpt-oss's clamped SwiGLU, g * sigmoid(alpha g) * (u + 1) with the gate g capped at limit from above and
 * u clamped to [-limit, limit], in transformers' order of operations. A NaN gate or up stays NaN, as in
 * torch (min/max return their second operand where either is NaN). */
static inline __m256 clamped_swiglu256(__m256 g, __m256 u, __m256 alpha, __m256 limit) {
    const __m256 one = _mm256_set1_ps(1.0f);
    g = _mm256_min_ps(limit, g);
    u = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), limit), _mm256_min_ps(limit, u));
    const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(g, alpha)));
    return _mm256_mul_ps(_mm256_add_ps(u, one), _mm256_mul_ps(g, _mm256_div_ps(one, _mm256_add_ps(one, e))));
}

/* act [rows, I] = the experts' activation of gu [rows, 2I]. I is whole 32-value blocks (the down
 * projection's input quantizes by them), so whole vectors. */
static void expert_activation(const float *gu, float *act, long rows, long I, const ExpertWeights *w) {
    if (w->activation != EXPERT_CLAMPED_SWIGLU) {
        gate_mul_columns(gu, act, rows, I, 0, (I + QPANEL - 1) / QPANEL, 0); /* SiLU */
        return;
    }
    const __m256 alpha = _mm256_set1_ps(w->alpha), limit = _mm256_set1_ps(w->limit);
    for (long r = 0; r < rows; r++) {
        const float *gate = gu + r * 2 * I, *up = gate + I;
        float *a = act + r * I;
        for (long c = 0; c < I; c += 8) {
            const __m256 g = _mm256_loadu_ps(gate + c), u = _mm256_loadu_ps(up + c);
            _mm256_storeu_ps(a + c, clamped_swiglu256(g, u, alpha, limit));
        }
    }
}

/* Stage 2, this thread's output columns (panels of K) through every routed expert: out[t, c] = the sum
 * over row t's slots, in the runs' order, of weight * down(act(gate, up))[c], from zero. Each thread
 * makes the activation of an expert's few rows itself (act [most rows, I]; cheaper to repeat than to
 * wait for); rows_k [most rows, K] takes the expert's down outputs. */
static void expert_down_share(long T, long K, long I, const ExpertRuns *runs, const ExpertWeights *w, const float *gu,
                              float *act, float *rows_k, float *out, const ThreadScratch *s, long me, long team,
                              int isa) {
    long first, last;
    share((K + QPANEL - 1) / QPANEL, me, team, &first, &last);
    const long from = first * QPANEL, to = last * QPANEL < K ? last * QPANEL : K;
    for (long t = 0; t < T; t++)
        for (long c = from; c < to; c++) out[t * K + c] = 0.0f;
    for (long i = 0; i < runs->active && first < last; i++) {
        const long rows = runs->starts[i + 1] - runs->starts[i], e = run_expert(runs, i);
        expert_activation(gu + runs->starts[i] * 2 * I, act, rows, I, w);
        const PackedParts expert = one_part(w->down[e], w->down_layout[e], K);
        own_panels(act, rows, I, &expert, NULL, rows_k, K, first, last, s, isa);
        for (long r = 0; r < rows; r++) {
            const long slot = runs->starts[i] + r;
            const float weight = runs->weights[slot];
            float *o = out + runs->tokens[slot] * K;
            const float *v = rows_k + r * K;
            for (long c = from; c < to; c++) o[c] += weight * v[c];
        }
    }
}

/* Scratch of one thread's routing of B rows among E experts, top k each (routing_longs longs). */
static inline long routing_longs(long B, long E, long k) { return 3 * B * k + 3 * E + 1; }

/* logits [B, E] (float32) -> the runs: transformers' rule for Qwen3-MoE and Mixtral, a softmax over
 * all E, the k most probable experts (the first of equal ones), and with `renormalize` their weights
 * rescaled to sum to 1. Slots are grouped by expert in ascending order, rows ascending within each, as
 * a stable sort of the (row, choice) slots by expert orders them. `space`: routing_longs(B, E, k). */
static void route_rows(const float *logits, long B, long E, long k, int renormalize, long *space, ExpertRuns *runs) {
    long *chosen = space, *ids = chosen + B * k, *starts = ids + E, *counts = starts + E + 1;
    int64_t *tokens = (int64_t *)(counts + E);
    float *picked = (float *)(tokens + B * k), *weights = picked + B * k;
    for (long e = 0; e < E; e++) counts[e] = 0;
    for (long b = 0; b < B; b++) {
        const float *row = logits + b * E;
        float best = row[0], total = 0.0f, kept = 0.0f;
        for (long e = 1; e < E; e++) best = row[e] > best ? row[e] : best;
        for (long e = 0; e < E; e++) total += expf(row[e] - best);
        /* The j-th choice is the best after the (j-1)-th in the order (probability down, id up). */
        long at = -1;
        for (long j = 0; j < k; j++) {
            const long before = at;
            at = -1;
            for (long e = 0; e < E; e++) {
                const int after = before < 0 || row[e] < row[before] || (row[e] == row[before] && e > before);
                if (after && (at < 0 || row[e] > row[at])) at = e;
            }
            if (at < 0) at = 0; /* NaN logits: keep the indices in range */
            chosen[b * k + j] = at;
            picked[b * k + j] = expf(row[at] - best) / total;
            kept += picked[b * k + j];
            counts[at]++;
        }
        if (renormalize)
            for (long j = 0; j < k; j++) picked[b * k + j] /= kept;
    }
    long active = 0, slot = 0;
    for (long e = 0; e < E; e++) {
        const long count = counts[e];
        if (!count) continue;
        ids[active] = e;
        starts[active++] = slot;
        counts[e] = slot; /* from here on, expert e's next free slot */
        slot += count;
    }
    starts[active] = slot;
    for (long b = 0; b < B; b++)
        for (long j = 0; j < k; j++) {
            const long to = counts[chosen[b * k + j]]++;
            tokens[to] = b;
            weights[to] = picked[b * k + j];
        }
    runs->active = active;
    runs->ids = ids;
    runs->starts = starts;
    runs->tokens = tokens;
    runs->weights = weights;
    runs->chosen = chosen;
    runs->picked = picked;
}

/* logits[:, e] += bias[e] for the experts [first, last): the router's bias (gpt-oss), after the product
 * as a linear layer adds it. */
static void add_router_bias(float *logits, long B, long E, const float *bias, long first, long last) {
    for (long b = 0; b < B; b++)
        for (long e = first; e < last; e++) logits[b * E + e] += bias[e];
}

/* out[b, from..to) += row b's routing-weighted sum of its k experts' down biases (bias [experts, K]),
 * summed over its choices best first and added once, as FusedMoE adds it after the experts' sum.
 * sum: [K] scratch. */
static void add_down_bias(float *out, long B, long K, long k, const ExpertRuns *runs, const float *bias, long from,
                          long to, float *sum) {
    for (long b = 0; b < B; b++) {
        for (long c = from; c < to; c++) sum[c] = 0.0f;
        for (long j = 0; j < k; j++) {
            const float weight = runs->picked[b * k + j], *row = bias + runs->chosen[b * k + j] * K;
            for (long c = from; c < to; c++) sum[c] += weight * row[c];
        }
        for (long c = from; c < to; c++) out[b * K + c] += sum[c];
    }
}

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

/* ---------------------------------------------------------------------------------------------------
 * One mixture-of-experts layer's routed experts on packed weights, in one parallel region (a decode
 * step gives each expert a row or a few, and a parallel region per small GEMM waits longer for its
 * threads than it computes). The routed slots come grouped by expert: slots [starts[e], starts[e + 1])
 * go to the e-th of the `active` experts listed, slot s carrying token tokens[s] of x [T, K] with
 * routing weight weights[s]; out [T, K] receives each token's weighted sum over its slots:
 *     out[t] = sum over t's slots s of weights[s] * down_e(act([gate_e | up_e](x[t]) + bias_e))
 * gate_up[e] holds the expert's [2I, K] weight (gate rows, then up rows) and down[e] its [K, I]
 * weight, both packed; gate_up_bias[e] its [2I] bias, or gate_up_bias NULL for none. act: silu(gate) *
 * up (activation EXPERT_SILU), or EXPERT_CLAMPED_SWIGLU with alpha and limit. A down bias is the
 * caller's (added once after the sum, as each token's weighted sum of its experts' biases). */
int batchlm_moe_experts(const float *x, long T, long K, long I, int active, const long *starts,
                        const int64_t *tokens, const float *weights, const uint8_t *const *gate_up,
                        const int *gate_up_layout, const uint8_t *const *down, const int *down_layout,
                        const float *const *gate_up_bias, int activation, float alpha, float limit, float *out,
                        int threads, int isa, long spin_ns, int *waits) {
    if (threads < 1) threads = 1;
    const ExpertRuns runs = {active, NULL, starts, tokens, weights};
    const ExpertWeights w = {gate_up, gate_up_layout, down, down_layout, gate_up_bias, activation, alpha, limit};
    const long R = starts[active], widest = K > I ? K : I, most_rows = most_rows_of(&runs);
    /* Shared: gate/up outputs [R, 2I]. Each thread's: an expert's gathered input rows (then its down
     * outputs), SiLU * up rows, and the quantized activations' scales. */
    const size_t shared = (size_t)R * 2 * (size_t)I;
    /* Quantized activations hold whole tiles' rows where the tile path may run (an expert of 8 rows
     * or more: a prompt's, or a popular expert's in a batch). */
    const long code_rows = takes_amx(isa, most_rows) ? amx_rows(most_rows) : most_rows;
    const size_t own = (size_t)most_rows * (size_t)(K + I) + 3 * (size_t)code_rows * (size_t)widest / QBLOCK + 16;
    const size_t own_codes = 2 * (size_t)code_rows * (size_t)widest;
    float *floats;
    int8_t *codes;
    if (alloc_scratch(shared + own * (size_t)threads, own_codes * (size_t)threads, &floats, &codes)) return -1;
    float *gu = floats;
    StageBarrier barrier;
    stage_barrier_init(&barrier, threads, spin_ns);
#pragma omp parallel num_threads(threads)
    {
        const long me = omp_get_thread_num(), team = omp_get_num_threads();
        float *rows_k = floats + shared + own * (size_t)me, *act = rows_k + most_rows * K;
        float *scales = act + most_rows * I;
        const ThreadScratch s = {.xq = codes + own_codes * (size_t)me,
                                 .xd = scales,
                                 .xb = scales + 2 * code_rows * widest / QBLOCK};
        expert_gate_up_share(x, K, I, &runs, &w, gu, rows_k, &s, me, team, isa);
        stage_done(&barrier, team);
        expert_down_share(T, K, I, &runs, &w, gu, act, rows_k, out, &s, me, team, isa);
    }
    waits[0] = atomic_load(&barrier.waits);
    waits[1] = atomic_load(&barrier.slept);
    free(floats);
    free(codes);
    return 0;
}
