/* Row operations for a quantized model's steps that do not take the fused decode stack (prompts,
 * bigger batches), with the stack's own arithmetic: a model's norms and gates are then one code
 * whichever path a step takes, and each is one parallel region over its rows instead of torch's
 * several passes (each waking the threads). Included by cpu_decode_stack.c after what they reuse. */

/* out[r] = rmsnorm(x[r] (+ residual[r])) * factor for rows r = t * inner + i, where row r of x lies at
 * t * ld + i * n (the heads of a token: inner > 1); with a residual the sum is stored to sum[r] too.
 * residual, sum and out are contiguous [tokens * inner, n]; n is a multiple of 8. */
void batchlm_rows_rms_norm(const float *x, long ld, const float *residual, float *sum, const float *factor,
                           float eps, float *out, long tokens, long inner, long n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < tokens * inner; r++) {
        const float *row = x + (r / inner) * ld + (r % inner) * n;
        if (residual) {
            float *s = sum + r * n;
            for (long c = 0; c < n; c++) s[c] = row[c] + residual[r * n + c];
            row = s;
        }
        rms_norm_rows(row, factor, out + r * n, 1, n, eps);
    }
}

/* act[r] = gate(gu[r, :I]) * gu[r, I:] for each row of the fused gate/up output (row stride ld), the
 * gate SiLU or (gelu) GELU with the tanh approximation. act is contiguous [rows, I]. */
void batchlm_rows_gate_mul(const float *gu, long ld, float *act, long rows, long I, int gelu, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) gate_mul_columns(gu + r * ld, act + r * I, 1, I, 0, (I + QPANEL - 1) / QPANEL, gelu);
}
