/* The attention stage of the fused decode step, #included by cpu_decode_stack.c after its types:
 * each new key rotated and stored in the cache, and each (row, KV group) item's query heads rotated
 * and attended over the row's context (its window's on a sliding-window layer), soft-capped where
 * the layer caps its scores.
 */

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
 * a time), the total is summed in order. With `sink` (else NULL), *sink is one more score whose weight
 * goes to no value (gpt-oss); it starts the max, as the decode kernel's does. */
static void softmax_in_place(float *scores, long length, const float *sink) {
    float best = sink ? *sink : -FLT_MAX, total = 0.0f;
    for (long t = 0; t < length; t++) best = scores[t] > best ? scores[t] : best;
    long t = 0;
    for (; t + 8 <= length; t += 8)
        _mm256_storeu_ps(scores + t, exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(best))));
    for (; t < length; t++) scores[t] = _mm256_cvtss_f32(exp256(_mm256_set1_ps(scores[t] - best)));
    for (t = 0; t < length; t++) total += scores[t];
    if (sink) total += _mm256_cvtss_f32(exp256(_mm256_set1_ps(*sink - best)));
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
        softmax_in_place(row, span, layer->sinks ? layer->sinks + h0 + j : NULL);
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
