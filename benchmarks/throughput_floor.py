"""The fastest an offline workload could run on a GPU: each step costs the larger of its bytes over
the memory bandwidth and its FLOPs over the peak matmul rate (bf16 weights and KV cache unless
--weights / --kv-cache-dtype say otherwise).

A decode step reads the dense weights, the LM head, the KV cache of every running request and, in a
mixture-of-experts layer, only the experts its tokens chose: with B tokens each picking k of E
experts uniformly at random, E * (1 - (1 - k/E)^B) distinct experts on average. Prefill is costed as
one pass over all prompt tokens (every expert read once). Every layer is costed as attending to its
whole context, so for sliding-window layers the real floor is lower. Defaults: an H200's measured
copy rate and its dense bf16 peak.

    python benchmarks/throughput_floor.py --shape qwen3-30b-a3b --num-requests 256 --input-len 512 --output-len 256

The floor lets a step's attention bytes overlap its linears' FLOPs; `in_turn_floor_*` costs them one
after the other, each at its own floor, as kernels that run in turn do. Both hold every request's
cache at once. With --kv-capacity-tokens the steps are instead the ones batchlm's scheduler makes
when the cache holds that many tokens (chunked prefill, preemption by recompute, --max-num-seqs),
each costed both ways: what a cache too small for the whole batch costs in the floor's own terms,
and which admission limit costs least.

--weights fp8 / w4a16 and --kv-cache-dtype fp8 cost the layers' linears (attention projections, MLPs
and experts) and the cache at the bytes of those formats; the LM head and MoE routers stay bf16, as
`--quantization` and the usual FP8 and 4-bit checkpoints leave them. FP8 linears run at the fp8 peak,
4-bit ones at the bf16 peak; attention at the bf16 peak (an FP8 cache is widened for the dot).
Experts of a config whose quantization_config is MXFP4 (gpt-oss's) cost 4.25 bits a weight (a scale
byte per 32 codes), at the bf16 peak (they are widened for the dot).
`floor_decode_step_ms` is the mean decode step, a single stream's inter-token latency floor.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

BYTES_PER_VALUE = 2  # bf16
H200_BANDWIDTH = 4.29e12  # bytes/s
H200_BF16_FLOPS = 792e12  # FLOP/s
H200_FP8_FLOPS = 1440e12  # FLOP/s

# Bytes a weight of the layers' linears takes: 4-bit codes carry a 16-bit scale and a 4-bit zero
# point per group of 128 (GPTQ's and `--quantization w4a16`'s layout); FP8's per-row scales are noise.
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "w4a16": 0.5 + (2 + 0.5) / 128, "mxfp4": 0.5 + 1 / 32}
KV_BYTES = {"bf16": 2.0, "fp8": 1.0}


@dataclass(frozen=True)
class Formats:
    """The layers' linear weights and the KV cache as stored, and the matmul peak of those linears."""

    weights: str = "bf16"
    kv_cache: str = "bf16"
    # The experts' format where it is not the linears' (MXFP4 checkpoints).
    experts: str | None = None

    def linear_flops(self, bf16_flops: float) -> float:
        # The fp8 peak scaled as the bf16 one is (both from the same machine's measurements).
        return bf16_flops * H200_FP8_FLOPS / H200_BF16_FLOPS if self.weights == "fp8" else bf16_flops


BF16 = Formats()


@dataclass(frozen=True)
class ShapeCost:
    """Parameter counts (in values) that decide a step's bytes and FLOPs."""

    # Attention projections and dense MLPs of all layers (the linears a weight format quantizes).
    dense_params: int
    lm_head_params: int
    # MoE routers (kept bf16 by every weight format).
    router_params: int
    # One expert's gate, up and down; how many layers have experts; experts per layer; chosen per token.
    expert_params: int
    sparse_layers: int
    num_experts: int
    top_k: int
    # Per token of context: KV values of all layers; attention FLOPs per (query, key) pair.
    kv_values_per_token: int
    attention_flops_per_pair: int


def shape_cost(config: dict[str, Any]) -> ShapeCost:
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    num_experts = config.get("num_experts") or config.get("num_local_experts") or 0
    sparse = _sparse_layers(config, num_experts)
    expert_inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    dense_mlp = 3 * hidden * config["intermediate_size"]
    dense = layers * attention + (layers - sparse) * dense_mlp
    return ShapeCost(
        dense_params=dense,
        lm_head_params=config["vocab_size"] * hidden,
        router_params=sparse * hidden * num_experts,
        expert_params=3 * hidden * expert_inter,
        sparse_layers=sparse,
        num_experts=num_experts,
        top_k=config.get("num_experts_per_tok", 0),
        kv_values_per_token=2 * layers * kv_heads * head_dim,
        attention_flops_per_pair=4 * layers * heads * head_dim,
    )


def _sparse_layers(config: dict[str, Any], num_experts: int) -> int:
    if not num_experts:
        return 0
    step = config.get("decoder_sparse_step", 1)
    dense_only = set(config.get("mlp_only_layers", []))
    return sum(1 for i in range(config["num_hidden_layers"]) if i not in dense_only and (i + 1) % step == 0)


def active_experts(cost: ShapeCost, tokens: int) -> float:
    """Expected distinct experts per sparse layer when `tokens` tokens route uniformly at random."""
    if not cost.num_experts:
        return 0.0
    return cost.num_experts * (1 - (1 - cost.top_k / cost.num_experts) ** tokens)


def step_seconds(
    cost: ShapeCost,
    tokens: int,
    kv_tokens: int,
    pairs: int,
    bandwidth: float,
    flops: float,
    overlap: bool = True,
    formats: Formats = BF16,
) -> float:
    """One forward over `tokens` new tokens that attend to `kv_tokens` cached ones (`pairs` query-key
    pairs). overlap=False: the attention and the linears each at their own floor, one after the other
    (as kernels that run in turn take them), instead of all bytes and all FLOPs overlapping."""
    experts = cost.sparse_layers * active_experts(cost, tokens) * cost.expert_params
    quantized_per_token = cost.dense_params + cost.sparse_layers * cost.top_k * cost.expert_params
    bf16_params = cost.lm_head_params + cost.router_params  # read and multiplied by every token
    expert_bytes = WEIGHT_BYTES[formats.experts or formats.weights]
    weight_bytes = (
        cost.dense_params * WEIGHT_BYTES[formats.weights]
        + experts * expert_bytes
        + bf16_params * BYTES_PER_VALUE
    )
    cache_bytes = kv_tokens * cost.kv_values_per_token * KV_BYTES[formats.kv_cache]
    attention_seconds = pairs * cost.attention_flops_per_pair / flops
    linear_seconds = 2 * tokens * (quantized_per_token / formats.linear_flops(flops) + bf16_params / flops)
    if not overlap:
        linears = max(weight_bytes / bandwidth, linear_seconds)
        return linears + max(cache_bytes / bandwidth, attention_seconds)
    return max((weight_bytes + cache_bytes) / bandwidth, linear_seconds + attention_seconds)


def experts_format(config: dict[str, Any]) -> str | None:
    """ "mxfp4" for a config whose checkpoint keeps its experts MXFP4, else None (the linears' format)."""
    quantization = config.get("quantization_config") or {}
    return "mxfp4" if str(quantization.get("quant_method", "")).lower() == "mxfp4" else None


def workload_floor(
    config: dict[str, Any],
    num_requests: int,
    input_len: int,
    output_len: int,
    bandwidth: float = H200_BANDWIDTH,
    flops: float = H200_BF16_FLOPS,
    overlap: bool = True,
    formats: Formats = BF16,
) -> dict[str, float]:
    """Floor time and output tokens/s for N requests of input_len prompt tokens and output_len outputs,
    all running at once (the first output token comes from the prefill)."""
    cost = shape_cost(config)
    prefill_pairs = num_requests * input_len * (input_len + 1) // 2
    prefill = step_seconds(
        cost, num_requests * input_len, 0, prefill_pairs, bandwidth, flops, overlap, formats
    )
    decode = sum(
        step_seconds(
            cost,
            num_requests,
            num_requests * context,
            num_requests * context,
            bandwidth,
            flops,
            overlap,
            formats,
        )
        for context in range(input_len + 1, input_len + output_len)
    )
    total = prefill + decode
    return {
        "floor_s": round(total, 3),
        "floor_prefill_s": round(prefill, 3),
        "floor_decode_s": round(decode, 3),
        "floor_decode_step_ms": round(1e3 * decode / max(output_len - 1, 1), 4),
        "floor_output_tok_s": round(num_requests * output_len / total, 1),
        "decode_active_experts_per_layer": round(active_experts(cost, num_requests), 1),
    }


class _InstantExecutor:
    """Samples token 0 for every sampled chunk at once, and costs each step as it is launched."""

    def __init__(self, cost: ShapeCost, bandwidth: float, flops: float, formats: Formats) -> None:
        self.cost, self.bandwidth, self.flops, self.formats = cost, bandwidth, flops, formats
        self.seconds = 0.0
        self.in_turn_seconds = 0.0
        self.prefill_tokens = 0
        self.steps = 0

    def execute_async(self, scheduled: Any) -> Any:
        from batchlm.core.step_io import ModelRunnerOutput

        tokens = kv_tokens = pairs = 0
        sampled = []
        for chunk in scheduled.chunks:
            new = len(chunk.token_ids)
            tokens += new
            kv_tokens += chunk.start_position
            pairs += new * chunk.start_position + new * (new + 1) // 2
            self.prefill_tokens += new if new > 1 else 0
            if chunk.sample:
                sampled.append(chunk.request_id)
        if scheduled.chunks:
            self.steps += 1
            costs = (self.cost, tokens, kv_tokens, pairs, self.bandwidth, self.flops)
            self.seconds += step_seconds(*costs, formats=self.formats)
            self.in_turn_seconds += step_seconds(*costs, overlap=False, formats=self.formats)
        output = ModelRunnerOutput(tuple(sampled), (0,) * len(sampled), (None,) * len(sampled))
        return SimpleNamespace(result=lambda: output)


def scheduled_floor(
    config: dict[str, Any],
    num_requests: int,
    input_len: int,
    output_len: int,
    kv_capacity_tokens: int,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int = 8192,
    block_size: int = 16,
    bandwidth: float = H200_BANDWIDTH,
    flops: float = H200_BF16_FLOPS,
    formats: Formats = BF16,
) -> dict[str, float]:
    """The floor of the steps the scheduler makes with a cache of kv_capacity_tokens (all requests
    arrive at once; prefix caching off, as in the offline benchmarks)."""
    from batchlm.core.engine_core import EngineCore
    from batchlm.core.scheduler import Scheduler
    from batchlm.core.scheduler_config import SchedulerConfig
    from batchlm.request import EngineCoreRequest
    from batchlm.sampling_params import SamplingParams

    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs or num_requests,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=input_len + output_len + block_size,
            block_size=block_size,
            num_blocks=kv_capacity_tokens // block_size,
            enable_prefix_caching=False,
        )
    )
    executor = _InstantExecutor(shape_cost(config), bandwidth, flops, formats)
    core = EngineCore(scheduler, executor, async_scheduling=True)  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, detokenize=False)
    prompt = tuple(range(1, input_len + 1))
    for index in range(num_requests):
        core.add_request(EngineCoreRequest(f"r{index}", prompt, params, (0,), 0.0, final_output_only=True))
    while core.has_work():
        core.step()
    return {
        "floor_s": round(executor.seconds, 3),
        "floor_output_tok_s": round(num_requests * output_len / executor.seconds, 1),
        "in_turn_floor_s": round(executor.in_turn_seconds, 3),
        "in_turn_floor_output_tok_s": round(num_requests * output_len / executor.in_turn_seconds, 1),
        "steps": executor.steps,
        "prefill_tokens": executor.prefill_tokens,
        "preemptions": scheduler.stats().num_preemptions,
    }


def main() -> None:
    from model_shapes import SHAPES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--kv-capacity-tokens",
        type=int,
        default=None,
        help="cost the scheduler's steps with a cache this large",
    )
    parser.add_argument("--max-num-seqs", type=int, default=None, help="with --kv-capacity-tokens")
    parser.add_argument(
        "--weights",
        choices=sorted(set(WEIGHT_BYTES) - {"mxfp4"}),
        default="bf16",
        help="the layers' linear weights (an MXFP4 config's experts are MXFP4 whatever this says)",
    )
    parser.add_argument("--kv-cache-dtype", choices=sorted(KV_BYTES), default="bf16")
    args = parser.parse_args()
    config = SHAPES[args.shape]
    formats = Formats(args.weights, args.kv_cache_dtype, experts_format(config))
    workload = (config, args.num_requests, args.input_len, args.output_len)
    floor = workload_floor(*workload, formats=formats)
    # The same workload with attention and linears each at their own floor in turn, not overlapped.
    in_turn = workload_floor(*workload, overlap=False, formats=formats)
    floor |= {
        "in_turn_floor_s": in_turn["floor_s"],
        "in_turn_floor_output_tok_s": in_turn["floor_output_tok_s"],
    }
    if args.kv_capacity_tokens:
        scheduled = scheduled_floor(
            config,
            args.num_requests,
            args.input_len,
            args.output_len,
            args.kv_capacity_tokens,
            args.max_num_seqs,
            formats=formats,
        )
        floor |= {f"scheduled_{key}": value for key, value in scheduled.items()}
        floor |= {"kv_capacity_tokens": args.kv_capacity_tokens, "max_num_seqs": args.max_num_seqs}
    print(
        json.dumps(
            {"shape": args.shape, "weights": args.weights, "kv_cache_dtype": args.kv_cache_dtype, **floor}
        )
    )


if __name__ == "__main__":
    main()
