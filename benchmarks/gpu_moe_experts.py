"""One mixture-of-experts layer's experts on the GPU (FusedMoE's grouped GEMMs, the routing and the
activation between them), dense bf16 stacks against MXFP4, FP8 and 4-bit stacks, at the token counts of
decode steps and a prefill chunk, in the experts' shape of a `benchmarks/model_shapes.py` MoE shape (gpt-oss-20b by
default: 32 experts of 2,880, 4 a token, clamped SwiGLU and biases; gpt-oss-120b's 128, or
qwen3-30b-a3b's 128 experts of 768, 8 a token). Random weights; each timing cycles through `--layers`
copies of the layer so the weights come from memory, as a step's layers do, and replays the launches
in a CUDA graph (the serving path). Prints microseconds a layer and the bytes of the experts the
tokens chose over that time, against the copy rate measured in the same run.

    python benchmarks/gpu_moe_experts.py --tokens 1 4 16 64 256 1024
    python benchmarks/gpu_moe_experts.py --shape qwen3-30b-a3b --formats bf16 fp8 int4

Run it from two trees (PYTHONPATH=tree/src) to compare builds on one machine.
"""

from __future__ import annotations

import argparse
import json

import torch
from attention_kernels import copy_bandwidth_gbs
from model_shapes import SHAPES

from batchlm.layers.moe import FusedMoE, MoESpec, warm_up_experts
from batchlm.layers.moe_routing import route_top_k
from batchlm.models.random_model import ARCHITECTURES
from batchlm.models.registry import get_model_class

DEVICE = torch.device("cuda")


MOE_SHAPES = sorted(
    name for name, config in SHAPES.items() if config.get("num_experts") or config.get("num_local_experts")
)


def experts_spec(shape: str) -> MoESpec:
    """The MoESpec a model of this shape gives its sparse layers (the family's own config reading)."""
    from transformers import AutoConfig

    config = dict(SHAPES[shape])
    model_type = config.pop("model_type")
    config.pop("quantization_config", None)
    hf_config = AutoConfig.for_model(model_type, **config)
    moe = get_model_class(ARCHITECTURES[model_type]).read_moe(hf_config)
    return moe.spec(int(config["hidden_size"]))


def median_seconds(run: object, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()  # type: ignore[operator]
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times = sorted(times[1:])
    return times[len(times) // 2]


def make_layers(spec: MoESpec, count: int, weights: str) -> list[FusedMoE]:
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    layers = []
    for _ in range(count):
        with torch.device(DEVICE):
            layer = FusedMoE(spec).to(torch.bfloat16)
        if weights == "mxfp4":
            layer.keep_mxfp4(DEVICE)
            assert layer.mxfp4 is not None
            layer.mxfp4.fill_random(0.02, generator)
        elif weights == "fp8":
            layer.keep_fp8(DEVICE)
            assert layer.fp8 is not None
            layer.fp8.fill_random(0.02, generator)
        elif weights == "int4":
            layer.keep_int4(DEVICE)
            assert layer.int4 is not None
            layer.int4.fill_random(0.02, generator)
        else:
            with torch.no_grad():
                layer.gate_up_proj.normal_(0.0, 0.02, generator=generator)
                layer.down_proj.normal_(0.0, 0.02, generator=generator)
        layers.append(layer)
    return layers


def expert_bytes(layer: FusedMoE, experts_used: float) -> float:
    """Bytes of `experts_used` experts' weights of one layer."""
    if layer.stacks is not None:
        per_expert = layer.stacks.nbytes() / layer.spec.num_experts
    else:
        per_expert = (layer.gate_up_proj.nbytes + layer.down_proj.nbytes) / layer.spec.num_experts
    return experts_used * per_expert


def time_layers(layers: list[FusedMoE], tokens: int, repeats: int) -> tuple[float, float]:
    """(seconds a layer, distinct experts a layer) for `tokens` tokens routed at random, in a graph."""
    spec = layers[0].spec
    generator = torch.Generator(device=DEVICE).manual_seed(tokens)
    x = torch.randn(tokens, spec.hidden_size, device=DEVICE, dtype=torch.bfloat16, generator=generator)
    logits = [torch.randn(tokens, spec.num_experts, device=DEVICE, generator=generator) for _ in layers]
    with torch.no_grad():
        for layer, layer_logits in zip(layers, logits, strict=True):  # compile outside the capture
            layer(x, route_top_k(layer_logits, spec.top_k, spec.renormalize))
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for layer, layer_logits in zip(layers, logits, strict=True):
                layer(x, route_top_k(layer_logits, spec.top_k, spec.renormalize))
    used = sum(
        torch.topk(layer_logits, spec.top_k, dim=-1).indices.unique().numel() for layer_logits in logits
    ) / len(layers)
    return median_seconds(graph.replay, repeats) / len(layers), used


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--shape", choices=MOE_SHAPES, default="gpt-oss-20b", help="whose experts")
    parser.add_argument("--layers", type=int, default=8, help="copies cycled (their weights outgrow L2)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--formats", nargs="+", choices=["bf16", "mxfp4", "fp8", "int4"], default=["bf16", "mxfp4"]
    )
    args = parser.parse_args()
    spec = experts_spec(args.shape)
    rate = copy_bandwidth_gbs()
    results = []
    for weights in args.formats:
        layers = make_layers(spec, args.layers, weights)
        warm_up_experts(torch.nn.ModuleList(layers))
        for tokens in args.tokens:
            seconds, used = time_layers(layers, tokens, args.repeats)
            read = expert_bytes(layers[0], used)
            results.append(
                {
                    "weights": weights,
                    "tokens": tokens,
                    "us_per_layer": round(seconds * 1e6, 2),
                    "experts_read": round(used, 1),
                    "gb_per_s": round(read / seconds / 1e9, 1),
                    "of_copy_rate": round(read / seconds / 1e9 / rate, 3),
                }
            )
            print(json.dumps(results[-1]), flush=True)
        del layers
        torch.cuda.empty_cache()
    print(
        json.dumps(
            {"shape": args.shape, "copy_rate_gb_s": round(rate, 1), "device": torch.cuda.get_device_name()}
        )
    )


if __name__ == "__main__":
    main()
