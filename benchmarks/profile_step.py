"""Where one engine step's time goes, on a workload of real shape with random weights: host time per phase
(scheduler, input building, forward launch, sampling, waiting for tokens, update, output processing) and,
on CUDA, the device's busy span per step and the idle gap between one step's end and the next one's start.

    python benchmarks/profile_step.py --shape llama-3.2-1b --num-requests 256 --input-len 512 --output-len 64
    python benchmarks/profile_step.py ... --async-scheduling off --sync   # exact serial split of each phase
    python benchmarks/profile_step.py ... --structured   # every request under a ~10-field JSON schema

The gap is measured with CUDA events: one recorded just before a step's first upload, one after its
sampling and token copy are queued (for a step with grammar masks, early in the next step's call). A
gap near zero means the next step was queued before the device finished the previous one. --sync synchronizes around each phase (no overlap; only with async off).
Only decode-only steps enter the per-step figures (prefill steps are few and much longer).
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from host_contention import BUSY_KINDS, busy_processes, threads_cpu_seconds
from model_shapes import dummy_llm
from offline_throughput import make_prompts
from structured_outputs import SUMMARY_FIELDS, long_output_schema, override_grammar_settings

# (phase, kind of the step last scheduled: "decode" when every chunk is one token, else "mixed") -> seconds.
TIMES: dict[tuple[str, str], float] = collections.defaultdict(float)
STEPS: dict[str, int] = collections.defaultdict(int)
# (seconds, phase, number of the step last scheduled) of every timed call, for --worst.
CALLS: list[tuple[float, str, int]] = []
# (phase, kind) -> CPU seconds of the calling thread in that phase: below the wall time when the thread
# waited (for the GIL, a lock, the device) or was descheduled, equal when it ran all along.
CPU_TIMES: dict[tuple[str, str], float] = collections.defaultdict(float)
CURRENT = {"kind": "mixed"}


def record(name: str, seconds: float, cpu_seconds: float) -> None:
    """One timed call of a phase, charged to the kind of step last scheduled."""
    TIMES[name, CURRENT["kind"]] += seconds
    CPU_TIMES[name, CURRENT["kind"]] += cpu_seconds
    CALLS.append((seconds, name, sum(STEPS.values())))


def timed(name: str, fn: Any, sync: bool = False) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if sync:
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.thread_time()
        result = fn(*args, **kwargs)
        if sync:
            torch.cuda.synchronize()
        record(name, time.perf_counter() - started, time.thread_time() - cpu_started)
        return result

    return wrapper


def timed_schedule(fn: Any) -> Any:
    """Times schedule() and notes what kind of step it produced (the phases after it are charged to it)."""

    def wrapper() -> Any:
        started, cpu_started = time.perf_counter(), time.thread_time()
        scheduled = fn()
        if scheduled.chunks:
            CURRENT["kind"] = "decode" if all(len(c.token_ids) == 1 for c in scheduled.chunks) else "mixed"
            STEPS[CURRENT["kind"]] += 1
        record("schedule", time.perf_counter() - started, time.thread_time() - cpu_started)
        return scheduled

    return wrapper


class StepEvents:
    """A (begin, end) CUDA event pair per launched step, and whether the step was decode-only."""

    def __init__(self) -> None:
        self.begins: list[torch.cuda.Event] = []
        self.ends: list[torch.cuda.Event] = []
        self.decode_only: list[bool] = []
        self._pending_begin: torch.cuda.Event | None = None

    def wrap_upload(self, upload: Any) -> Any:
        def wrapper(arrays: Any) -> Any:
            if self._pending_begin is None:
                self._pending_begin = _event()
            return upload(arrays)

        return wrapper

    def wrap_launch(self, launch: Any) -> Any:
        def wrapper(scheduled: Any) -> Any:
            pending = launch(scheduled)
            if self._pending_begin is not None:
                self.begins.append(self._pending_begin)
                self.decode_only.append(all(len(c.token_ids) == 1 for c in scheduled.chunks))
                self._pending_begin = None
                if getattr(pending, "is_resolved", False):
                    self.ends.append(_event())  # it sampled nothing: it ends with its forward pass
            return pending

        return wrapper

    def wrap_sample(self, sample: Any) -> Any:
        """A step ends once its sampling is queued (for a step with grammar masks, in the next call)."""

        def wrapper(*args: Any) -> Any:
            pending = sample(*args)
            self.ends.append(_event())
            return pending

        return wrapper

    def report(self) -> dict[str, float]:
        """Median device span and idle gap (ms) over decode-only steps; totals (s) over all steps."""
        torch.cuda.synchronize()
        spans: dict[bool, list[float]] = {True: [], False: []}
        gaps: dict[bool, list[float]] = {True: [], False: []}
        for index, decode_only in enumerate(self.decode_only[: len(self.ends)]):
            spans[decode_only].append(self.begins[index].elapsed_time(self.ends[index]))
            if index > 0:
                gaps[decode_only].append(self.ends[index - 1].elapsed_time(self.begins[index]))
        figures: dict[str, float] = {}
        if gaps[True]:
            figures |= {
                "decode_steps": len(spans[True]),
                "span_ms_median": statistics.median(spans[True]),
                "gap_ms_median": statistics.median(gaps[True]),
                "gap_ms_mean": statistics.fmean(gaps[True]),
                "idle_fraction": sum(gaps[True]) / (sum(gaps[True]) + sum(spans[True])),
            }
        figures |= {
            "total_decode_span_s": sum(spans[True]) / 1000,
            "total_mixed_span_s": sum(spans[False]) / 1000,
            "total_gap_s": (sum(gaps[True]) + sum(gaps[False])) / 1000,
        }
        return figures

    def largest_gaps(self, count: int) -> list[tuple[float, int, str]]:
        """(gap ms, number of the step after it, its kind and its predecessor's) of the longest idle gaps."""
        kinds = {True: "decode", False: "mixed"}
        gaps = [
            (
                self.ends[index - 1].elapsed_time(self.begins[index]),
                index,
                f"{kinds[self.decode_only[index - 1]]} -> {kinds[decode_only]}",
            )
            for index, decode_only in enumerate(self.decode_only[: len(self.ends)])
            if index > 0
        ]
        return sorted(gaps, reverse=True)[:count]


class GcPauses:
    """Python's cyclic collections during the measured pass: count and total pause by generation."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = collections.defaultdict(list)
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            took = time.perf_counter() - self._started
            self.pauses[info["generation"]].append(took)
            CALLS.append((took, f"gc gen{info['generation']}", sum(STEPS.values())))

    def summary(self) -> str:
        return " ".join(
            f"gen{gen}: {len(times)} x, {1000 * sum(times):.1f} ms (max {1000 * max(times):.2f})"
            for gen, times in sorted(self.pauses.items())
        )


def _event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def instrument(llm: Any, sync: bool) -> StepEvents | None:
    from batchlm.engine import llm as llm_module
    from batchlm.runner.step_output import PendingStepOutput

    core = llm.engine_core
    runner = core.executor
    core.scheduler.schedule = timed_schedule(core.scheduler.schedule)
    core.scheduler.update_from_output = timed("update", core.scheduler.update_from_output)
    # build() goes through build_unfilled(), which a step after a deferred one calls alone.
    runner.input_builder.build_unfilled = timed("inputs", runner.input_builder.build_unfilled, sync)
    runner._forward = timed("forward", runner._forward, sync)
    runner.sampler.sample_on_device = timed("sample", runner.sampler.sample_on_device, sync)
    PendingStepOutput.result = timed("wait tokens", PendingStepOutput.result)  # type: ignore[method-assign]
    runner._resolve_outputs = timed("resolve", runner._resolve_outputs)
    instrument_grammar(runner.grammars)
    instrument_step_masks(runner)
    llm_module.OutputProcessor.process = timed("process", llm_module.OutputProcessor.process)  # type: ignore[method-assign]
    if not torch.cuda.is_available():
        return None
    events = StepEvents()
    uploader = runner.input_builder.uploader
    uploader.upload = events.wrap_upload(uploader.upload)
    runner.execute_async = events.wrap_launch(runner.execute_async)
    runner._sample = events.wrap_sample(runner._sample)
    return events


def instrument_step_masks(runner: Any) -> None:
    """The engine thread's own structured-output work, nested in the phases above: the runner's
    StepMasks calls (their waits are timed apart as well) and applying the masks to the logits."""
    import batchlm.sampling.sampler as sampler_module

    masks = runner.masks
    masks.start = timed("  masks: start", masks.start)
    masks.result = timed("  masks: result", masks.result)
    masks.prefetch = timed("  masks: prefetch", masks.prefetch)
    sampler_module.apply_grammar_masks = timed("  masks: applied", sampler_module.apply_grammar_masks)


def instrument_grammar(grammars: Any) -> None:
    """Times the grammar phases: starting a step's masks and waiting for them (computed that step or
    prefetched by the last one), and, on the worker thread overlapping the others, advancing the
    matchers and filling the bitmasks."""
    from concurrent.futures import Future

    def timed_future(start: Any, started_name: str, wait_name: str) -> Any:
        def begin(*args: Any) -> Any:
            begun = time.perf_counter()
            future: Future[Any] = start(*args)
            TIMES[started_name, CURRENT["kind"]] += time.perf_counter() - begun
            read = future.result

            def timed_result(timeout: float | None = None) -> Any:
                waited = time.perf_counter()
                result = read(timeout)
                TIMES[wait_name, CURRENT["kind"]] += time.perf_counter() - waited
                return result

            future.result = timed_result  # type: ignore[method-assign]
            return future

        return begin

    grammars.start_masks = timed_future(grammars.start_masks, "masks start", "masks wait")
    grammars.prefetch_masks = timed_future(grammars.prefetch_masks, "prefetch start", "prefetch wait")
    compute, prefetch = grammars._compute, grammars._prefetch
    grammars._compute = lambda *args: timed("masks (worker)", compute)(*args)
    grammars._prefetch = lambda backend, rows, sequences, sampled, out: timed("prefetch (worker)", prefetch)(
        backend, rows, sequences, timed("  tokens wait", sampled), out
    )
    from batchlm.structured.llguidance_backend import LLGuidanceBackend

    LLGuidanceBackend.fill_bitmasks = timed("  fill", LLGuidanceBackend.fill_bitmasks)  # type: ignore[method-assign]
    make_backend = LLGuidanceBackend.__init__

    def backend_with_timed_executor(self: Any, *args: Any, **kwargs: Any) -> None:
        make_backend(self, *args, **kwargs)
        self._executor = timed_llguidance(self._executor)

    LLGuidanceBackend.__init__ = backend_with_timed_executor  # type: ignore[method-assign]
    if isinstance(grammars._backend, LLGuidanceBackend):  # built by the warm-up already
        grammars._backend._executor = timed_llguidance(grammars._backend._executor)
        grammars._batch = None
    LLGuidanceBackend.advance = timed("  accept", LLGuidanceBackend.advance)  # type: ignore[method-assign]


def timed_llguidance(executor: Any) -> Any:
    """llguidance's executor with its two batched calls timed alone (the Rust side of the fill and of
    the advance, apart from the Python around them), as phases of the current step."""
    from grammar_host_step import TimedExecutor

    def record(name: str, seconds: float) -> None:
        TIMES[f"    {name} in llguidance", CURRENT["kind"]] += seconds

    return TimedExecutor(executor, record)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--structured", action="store_true", help="every request under a JSON schema")
    parser.add_argument(
        "--summary-field",
        choices=sorted(SUMMARY_FIELDS),
        default="bounded",
        help="with --structured: the schema's last, long text field has minLength 4000 or no bound",
    )
    parser.add_argument("--mask-threads", type=int, help="llguidance threads (default: the engine's choice)")
    parser.add_argument(
        "--default-switch-interval", action="store_true", help="keep Python's GIL switch interval (5 ms)"
    )
    parser.add_argument("--sync", action="store_true", help="synchronize around each phase (exact GPU split)")
    parser.add_argument(
        "--busy-processes",
        type=int,
        default=0,
        metavar="N",
        help="N processes keep other cores busy during the measured pass (see --busy-kind)",
    )
    parser.add_argument("--busy-kind", choices=sorted(BUSY_KINDS), default="spin")
    parser.add_argument(
        "--worst", type=int, default=0, help="also list the N slowest phase calls and the N longest idle gaps"
    )
    args = parser.parse_args()
    from batchlm import SamplingParams

    llm = dummy_llm(
        args.shape,
        args.num_requests,
        args.input_len + args.output_len + 16,
        full_vocab_tokenizer=args.structured,
        async_scheduling=args.async_scheduling,
    )
    if args.sync and llm.engine_core.async_scheduling:
        parser.error("--sync serialises every phase: use it with --async-scheduling off")
    prompts = make_prompts(args.num_requests, args.input_len, llm.info.vocab_size, 0)
    params = SamplingParams(
        max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature, detokenize=False
    )
    # --default-switch-interval: the interval the interpreter has now (Python's 5 ms) stays.
    default_interval_ms = 1e3 * sys.getswitchinterval() if args.default_switch_interval else None
    override_grammar_settings(mask_threads=args.mask_threads, switch_interval_ms=default_interval_ms)
    if args.structured:
        import json

        from batchlm.sampling_params import StructuredOutputs

        params = params.clone(
            structured_outputs=StructuredOutputs(json=json.dumps(long_output_schema(args.summary_field)))
        )
    # A whole warm-up pass: every kernel shape the measured pass meets is compiled and tuned first.
    llm.generate(prompts, params, use_tqdm=False)
    events = instrument(llm, args.sync and torch.cuda.is_available())
    CALLS.clear()
    pauses = GcPauses()
    core = llm.engine_core
    with busy_processes(args.busy_processes, args.busy_kind):
        threads_before = threads_cpu_seconds()
        started = time.perf_counter()
        steps_before = core.num_steps
        handed_before = core.executor.masks.steps_handed_to_device
        llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        threads_cpu = threads_cpu_seconds()
        threads_cpu.subtract(threads_before)
    steps = core.num_steps - steps_before
    mode = "on" if core.async_scheduling else "off"
    print(
        f"{steps} steps in {elapsed:.2f} s ({1000 * elapsed / steps:.2f} ms/step), async={mode}, sync={args.sync}"
    )
    for kind in ("decode", "mixed"):
        if not STEPS[kind]:
            continue
        phases = {name: total for (name, step_kind), total in TIMES.items() if step_kind == kind}
        print(f"host time per {kind} step ({STEPS[kind]} steps; mixed = with prefill chunks), wall and")
        print("the calling thread's CPU time (lower when it waited or was descheduled):")
        for name, total in sorted(phases.items(), key=lambda kv: -kv[1]):
            cpu = CPU_TIMES.get((name, kind))
            cpu_column = f" {1000 * cpu / STEPS[kind]:7.3f} ms cpu" if cpu is not None else ""
            print(f"  {name:12s} {1000 * total / STEPS[kind]:7.3f} ms{cpu_column}")
    if args.structured:
        handed = core.executor.masks.steps_handed_to_device - handed_before
        print(f"steps whose masks the device waited for, the engine thread going on: {handed} of {steps}")
    if events is not None:
        figures = events.report()
        print("device, decode-only steps:", " ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    print("garbage collections:", pauses.summary() or "none")
    busy = [(name, seconds) for name, seconds in threads_cpu.most_common() if seconds > 0]
    print(
        f"CPU time of this process's threads over the pass, by name ({sum(threads_cpu.values()):.2f} s in all; "
        f"cores busy on average: {sum(threads_cpu.values()) / elapsed:.2f}):"
    )
    print("  " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in busy))
    if args.worst:
        # Waits and worker phases overlap the device by design; the rest is the host's own work.
        own = [call for call in CALLS if "wait" not in call[1] and "worker" not in call[1]]
        print(f"the {args.worst} slowest host phase calls (ms, phase, steps scheduled by then):")
        for took, name, step in sorted(own, reverse=True)[: args.worst]:
            print(f"  {1000 * took:8.3f}  {name:12s} {step}")
        if events is not None:
            print(
                f"the {args.worst} longest idle gaps (ms, launch number of the step after, kinds), each with"
            )
            print("the host calls made while that step and the one before were scheduled (ms):")
            for gap, index, kinds in events.largest_gaps(args.worst):
                near = [f"{name} {1000 * took:.2f}" for took, name, step in own if step in (index, index + 1)]
                print(f"  {gap:8.3f}  {index:4d}  {kinds}: {', '.join(near)}")


if __name__ == "__main__":
    main()
