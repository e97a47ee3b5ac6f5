"""Offline throughput: N requests of fixed input/output length through batchlm.LLM, against
transformers on the same model and workload in the same run.

CPU (issue 2):  python benchmarks/offline_throughput.py --shape smollm2-135m --num-requests 32 \
                    --input-len 128 --output-len 64 --compare-hf
GPU (issue 5):  python benchmarks/offline_throughput.py --shape llama-3.2-1b --num-requests 256 \
                    --input-len 512 --output-len 256 --runs 3
Quantized (issue 21): add --quantization fp8 / w4a16 (with --dummy: random weights quantized at load,
the real shapes) and --kv-cache-dtype fp8.
MoE (issue 18): the same with --shape qwen3-30b-a3b --dummy; the summary gives the H200 floor
                (benchmarks/throughput_floor.py) and the fraction of it reached.
Structured outputs (issue 17): add --structured to alternate, in the same engine, runs where every
request is under a ~10-field JSON schema (structured_outputs.long_output_schema) with runs without one
(--summary-field free: its long last field without the length bound that makes llguidance's masks costly);
the tokenizer is padded to the model's vocabulary so masks cover a real-size vocabulary. The schema's
first pass over the whole batch, while the grammar's lexer states are still being built, is timed
apart (batchlm-structured-first-pass) and kept out of the medians.
Prints one JSON line per run and a summary with medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from host_contention import BUSY_KINDS, busy_processes, pin_calling_thread_apart
from model_shapes import SHAPES, write_config_only, write_random_weights
from structured_outputs import SUMMARY_FIELDS, long_output_schema, override_grammar_settings
from throughput_floor import WEIGHT_BYTES, Formats, experts_format, workload_floor


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    # Skip the first ids (special tokens in our tokenizers) so prompts hold ordinary tokens.
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(num)]


def run_batchlm(args: argparse.Namespace, model_dir: Path, prompts: list[list[int]]) -> list[dict[str, Any]]:
    from batchlm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        device=args.device,
        dtype=args.dtype,
        load_format="dummy" if args.dummy else "auto",
        max_model_len=args.input_len + args.output_len + 16,
        max_num_seqs=args.max_num_seqs or len(prompts),
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,
        tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        speculative=args.speculative,
    )
    load_s = time.perf_counter() - started
    params = SamplingParams(
        max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature, detokenize=False
    )
    kinds = {"plain": params}
    if args.structured:
        from batchlm.sampling_params import StructuredOutputs

        override_grammar_settings(args.mask_threads, args.templates_per_thread, args.switch_interval_ms)
        spec = StructuredOutputs(json=json.dumps(long_output_schema(args.summary_field)))
        kinds["structured"] = params.clone(structured_outputs=spec)
    for warm_up in kinds.values():
        llm.generate(
            prompts[: min(4, len(prompts))], warm_up, use_tqdm=False
        )  # warm-up (lazy init, autotuning, grammar)
    scheduler = llm.engine_core.scheduler
    # What the cache holds bounds how many requests run at once (see throughput_floor.py).
    kv_cache_tokens = scheduler.num_total_blocks * scheduler.config.block_size

    def timed_run(run: int, engine: str, params: SamplingParams) -> dict[str, Any]:
        preempted_before = scheduler.stats().num_preemptions
        _sync()
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        _sync()
        elapsed = time.perf_counter() - started
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        itls = [
            (o.metrics.last_token_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
            for o in outputs
            if o.metrics and o.metrics.first_token_time and o.metrics.last_token_time
        ]
        assert generated == args.output_len * len(prompts), (
            "every request must produce exactly output_len tokens"
        )
        result = {
            "engine": engine,
            "run": run,
            "load_s": round(load_s, 2),
            "elapsed_s": round(elapsed, 3),
            "output_tokens": generated,
            "output_tok_s": round(generated / elapsed, 1),
            "total_tok_s": round((generated + sum(map(len, prompts))) / elapsed, 1),
            # Mean gap between a request's tokens after its first (its inter-token latency), median over requests.
            "itl_ms_median": round(1000 * statistics.median(itls), 3) if itls else None,
            "kv_cache_tokens": kv_cache_tokens,
            "preemptions": scheduler.stats().num_preemptions - preempted_before,
        }
        print(json.dumps(result), flush=True)
        return result

    if args.pin_engine_thread is not None:
        print(json.dumps({"pinned": pin_calling_thread_apart(args.pin_engine_thread)}), flush=True)
    results = []
    if args.structured:
        # The schema's first pass over the whole batch, reported apart from the medians: llguidance
        # builds each compiled copy's lexer states as rows first reach them, which a server serving
        # the schema again keeps (the four-request warm-up reaches only a few of the copies).
        results.append(timed_run(-1, "batchlm-structured-first-pass", kinds["structured"]))
    for run, kind in ((run, kind) for run in range(args.runs) for kind in kinds):
        results.append(timed_run(run, "batchlm" if kind == "plain" else "batchlm-structured", kinds[kind]))
    if args.busy_processes:
        with busy_processes(args.busy_processes, args.busy_kind):
            for run in range(args.runs):
                results.append(timed_run(run, "batchlm-beside-busy-cores", kinds["plain"]))
    return results


def run_transformers(
    args: argparse.Namespace, model_dir: Path, prompts: list[list[int]]
) -> list[dict[str, Any]]:
    """transformers' own batched generate (one static batch; all prompts have the same length)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.dummy:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    batch = torch.tensor(prompts, device=device)
    kwargs = {
        "max_new_tokens": args.output_len,
        "min_new_tokens": args.output_len,
        "do_sample": args.temperature > 0,
        "pad_token_id": 0,
    }
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_k=0, top_p=1.0)
    results = []
    for run in range(args.runs):
        _sync()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(batch, attention_mask=torch.ones_like(batch), **kwargs)
        _sync()
        elapsed = time.perf_counter() - started
        generated = int((out.shape[1] - batch.shape[1]) * out.shape[0])
        results.append(
            {
                "engine": "transformers.generate",
                "run": run,
                "elapsed_s": round(elapsed, 3),
                "output_tokens": generated,
                "output_tok_s": round(generated / elapsed, 1),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: all requests at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split across")
    parser.add_argument("--quantization", choices=["int8", "fp8", "w4a16"], default=None)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp16", "fp32", "fp8"], default="auto")
    parser.add_argument("--dummy", action="store_true", help="random weights made on the device (GPU shapes)")
    parser.add_argument("--compare-hf", action="store_true", help="also time transformers' generate")
    parser.add_argument("--structured", action="store_true", help="also time runs under a JSON schema")
    parser.add_argument(
        "--summary-field",
        choices=sorted(SUMMARY_FIELDS),
        default="bounded",
        help="with --structured: the schema's last, long text field has minLength 4000 or no bound",
    )
    parser.add_argument(
        "--mask-threads",
        type=int,
        default=None,
        help="with --structured: llguidance's threads (default: the engine's)",
    )
    parser.add_argument(
        "--templates-per-thread",
        type=int,
        default=None,
        help="with --structured: compiled copies of the schema's grammar per mask thread (default: the engine's)",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="with --structured: Python's GIL switch interval once constrained requests run "
        "(default: the engine's)",
    )
    parser.add_argument(
        "--pin-engine-thread",
        type=int,
        default=None,
        metavar="CORE",
        help="after the warm-up, the engine thread on this core alone and the process's other threads off it",
    )
    parser.add_argument(
        "--busy-processes",
        type=int,
        default=0,
        metavar="N",
        help="then also time plain runs while N processes keep other cores busy (batchlm-beside-busy-cores)",
    )
    parser.add_argument("--busy-kind", choices=sorted(BUSY_KINDS), default="spin", help="what they do")
    parser.add_argument("--model-dir", type=Path, default=None, help="where to write/reuse the random model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speculative", choices=["auto", "off", "ngram"], default="auto")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / f"batchlm-bench-{args.shape}"
    if args.dummy:
        write_config_only(args.shape, model_dir)
    else:
        write_random_weights(args.shape, model_dir, seed=args.seed)
    if args.structured:
        from mlx_vs_mlx_lm_server import pad_tokenizer_vocab

        pad_tokenizer_vocab(model_dir / "tokenizer.json", SHAPES[args.shape]["vocab_size"])
    prompts = make_prompts(args.num_requests, args.input_len, SHAPES[args.shape]["vocab_size"], args.seed)
    results = run_batchlm(args, model_dir, prompts)
    if args.compare_hf:
        results += run_transformers(args, model_dir, prompts)
    summary: dict[str, Any] = {
        "shape": args.shape,
        "workload": f"{args.num_requests} x {args.input_len} in / {args.output_len} out",
        "tensor_parallel_size": args.tensor_parallel_size,
        "quantization": args.quantization or "none",
        "kv_cache_dtype": args.kv_cache_dtype,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    for engine in sorted({r["engine"] for r in results}):
        rates = [r["output_tok_s"] for r in results if r["engine"] == engine]
        summary[f"{engine} median output tok/s"] = statistics.median(rates)
    # The H200 floor of this workload in its weight and cache formats (meaningful for GPU runs only).
    formats = Formats(
        weights=args.quantization if args.quantization in WEIGHT_BYTES else "bf16",
        kv_cache="fp8" if args.kv_cache_dtype == "fp8" else "bf16",
        experts=experts_format(SHAPES[args.shape]),
    )
    summary["h200_floor"] = workload_floor(
        SHAPES[args.shape], args.num_requests, args.input_len, args.output_len, formats=formats
    )
    summary["of_h200_floor"] = round(
        summary["batchlm median output tok/s"] / summary["h200_floor"]["floor_output_tok_s"], 3
    )
    if args.structured:
        summary["summary_field"] = args.summary_field
        summary["structured_over_plain"] = round(
            summary["batchlm-structured median output tok/s"] / summary["batchlm median output tok/s"], 3
        )
        summary["structured_first_pass_over_plain"] = round(
            summary["batchlm-structured-first-pass median output tok/s"]
            / summary["batchlm median output tok/s"],
            3,
        )
        # Each structured run against the plain run just before it: a host whose speed drifts over
        # the call (H200 hosts do, by ~10%) moves both runs of a pair alike.
        plain = [r["output_tok_s"] for r in results if r["engine"] == "batchlm"]
        structured = [r["output_tok_s"] for r in results if r["engine"] == "batchlm-structured"]
        summary["structured_over_plain_pairs"] = [
            round(s / p, 3) for p, s in zip(plain, structured, strict=True)
        ]
    if args.compare_hf:
        summary["ratio"] = round(
            summary["batchlm median output tok/s"] / summary["transformers.generate median output tok/s"], 2
        )
    print(json.dumps(summary), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
