"""The routed experts of a CPU decode step: a few mixture-of-experts layers (FusedMoE on quantized
experts, as a GGUF file's or an MXFP4 checkpoint's load them) stepped one token at a time, in a
gpt-oss shape (clamped SwiGLU, gate/up and down biases) and in the same shape as Qwen3-MoE (SiLU, no
biases). Random weights: MXFP4 blocks (4-bit table panels) or Q8_0 of random floats; a step is every
layer's experts on a fresh token routed at random. Prints the median milliseconds a step of each
round, and whether the experts took the fused kernel (QuantizedExperts.kernel). --per-expert adds each
family's experts with the kernel taken away (one quantized matmul at a time, from Python), timed in
the same process and rounds, so a machine whose load drifts slows both alike.

    python benchmarks/cpu_moe_experts.py --weights mxfp4 --layers 2 --rounds 5 --per-expert
    python benchmarks/cpu_moe_experts.py --weights q8_0 --family gpt_oss --tokens 4

Run it from two trees alternately (PYTHONPATH=tree/src) to compare builds in the same sitting.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from batchlm.layers.moe import DOWN, GATE, UP, FusedMoE, MoESpec
from batchlm.layers.moe_routing import route_top_k
from batchlm.layers.quantization.base import QuantizedTensor

# gpt-oss's experts: its clamped SwiGLU (alpha, limit as its config states them) and biases.
FAMILIES = {
    "gpt_oss": {
        "hidden_act": "swiglu_clamped",
        "act_options": (("alpha", 1.702), ("limit", 7.0)),
        "expert_bias": True,
    },
    "qwen3_moe": {},
}
MXFP4_BLOCK_BYTES = 17  # an exponent byte and 32 4-bit codes


def random_mxfp4(rows: int, cols: int, rng: np.random.Generator) -> QuantizedTensor:
    """A GGUF MXFP4 tensor of random codes, exponents 2^-8..2^-5 (float16-exact, as real weights are)."""
    blocks = rng.integers(0, 256, size=(rows, cols // 32, MXFP4_BLOCK_BYTES), dtype=np.uint8)
    blocks[:, :, 0] = rng.integers(120, 124, size=(rows, cols // 32), dtype=np.uint8)
    return QuantizedTensor("MXFP4", torch.from_numpy(blocks.reshape(rows, -1)), cols, 32, MXFP4_BLOCK_BYTES)


def expert_layer(family: str, args: argparse.Namespace, seed: int) -> FusedMoE:
    spec = MoESpec(args.experts, args.top_k, args.hidden, args.inter, True, **FAMILIES[family])  # type: ignore[arg-type]
    layer = FusedMoE(spec)
    layer.quantize_experts()
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    for expert in range(args.experts):
        for part, (rows, cols) in (
            (GATE, (args.inter, args.hidden)),
            (UP, (args.inter, args.hidden)),
            (DOWN, (args.hidden, args.inter)),
        ):
            if args.weights == "mxfp4":
                layer.load_expert("bench", expert, part, random_mxfp4(rows, cols, rng))
            else:
                layer.load_expert("bench", expert, part, torch.randn(rows, cols, generator=generator) * 0.02)
    if layer.gate_up_proj_bias is not None and layer.down_proj_bias is not None:
        layer.gate_up_proj_bias.normal_(0.0, 0.1, generator=generator)
        layer.down_proj_bias.normal_(0.0, 0.1, generator=generator)
    return layer


@torch.no_grad()
def step_ms(layers: list[FusedMoE], args: argparse.Namespace, generator: torch.Generator) -> float:
    """Milliseconds of `args.steps` steps through every layer, a step's mean."""
    inputs = [torch.randn(args.tokens, args.hidden, generator=generator) for _ in range(args.steps)]
    choices = [
        route_top_k(torch.randn(args.tokens, args.experts, generator=generator), args.top_k, True)
        for _ in range(args.steps * len(layers))
    ]
    start = time.perf_counter()
    for step, x in enumerate(inputs):
        for index, layer in enumerate(layers):
            x = layer(x, choices[step * len(layers) + index]) * 1e-2 + x
    return (time.perf_counter() - start) * 1e3 / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", choices=["mxfp4", "q8_0"], default="mxfp4")
    parser.add_argument("--family", choices=[*FAMILIES, "both"], default="both")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--inter", type=int, default=2880)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-expert", action="store_true", help="also time the experts without the kernel")
    parser.add_argument("--threads", type=int, help="torch's (and so the kernels') threads; default torch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    families = list(FAMILIES) if args.family == "both" else [args.family]
    stacks = {family: [expert_layer(family, args, seed=i) for i in range(args.layers)] for family in families}
    kernels = {
        family: [layer.quantized.kernel for layer in stacks[family] if layer.quantized] for family in families
    }
    variants = [
        (family, fused) for family in families for fused in ((True, False) if args.per_expert else (True,))
    ]
    generator = torch.Generator().manual_seed(0)
    times: dict[tuple[str, bool], list[float]] = {variant: [] for variant in variants}
    for round_ in range(
        args.rounds + 1
    ):  # variants alternate, so drifting load on the machine hits all alike
        for family, fused in variants:
            for layer, kernel in zip(stacks[family], kernels[family], strict=True):
                assert layer.quantized is not None
                layer.quantized.kernel = kernel if fused else None
            elapsed = step_ms(stacks[family], args, generator)
            if round_:  # the first round warms up (pages the weights in)
                times[family, fused].append(elapsed)
    for family, fused in variants:
        on_kernel = fused and kernels[family][0] is not None
        rounds = ", ".join(f"{t:.2f}" for t in times[family, fused])
        print(
            f"{family:9s} {args.weights} layers={args.layers} tokens={args.tokens} "
            f"threads={torch.get_num_threads()} fused={on_kernel}: "
            f"median {statistics.median(times[family, fused]):.2f} ms/step (rounds: {rounds})"
        )


if __name__ == "__main__":
    main()
