"""The GGML tensor types batchlm loads from GGUF files, by how each loads."""

from __future__ import annotations

# The GGML tensor types we load, by how they load (the one list: the start-up check and the load's
# progress log read it). Floats load as they are. Every block type loads dense through the gguf
# package's numpy reference code (gguf.quants.dequantize) where our quantized CPU kernels do not run.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
# Block types the quantized CPU kernels read quickly from the file's blocks (kernels/quant_blocks.py):
# exactly, bar float16 rounding of Q4_K's, Q5_K's and IQ4_XS's sub-block scales (and an MXFP4 tensor
# with exponents beyond float16's range, requantized to Q8_0); Q6_K requantized to Q8_0 in one native
# pass (cpu_quant.q6_k_as_q8).
KERNEL_TYPES = frozenset(
    {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4"}
)
# Block types only the reference code reads, on every path: the kernels take them requantized to
# Q8_0 from its values. Q2_K (whose per-16 offsets dmin * m no per-32 bias holds), the i-quants of
# importance-matrix files and the ternary TQ types: tens of seconds a GB of them (the load logs its
# progress: gguf_progress.py).
REFERENCE_TYPES = frozenset(
    {
        "Q2_K",
        *("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"),
        *("TQ1_0", "TQ2_0"),
    }
)
SUPPORTED_TYPES = FLOAT_TYPES | KERNEL_TYPES | REFERENCE_TYPES
