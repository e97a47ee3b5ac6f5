"""Multiple-choice scoring as lm-evaluation-harness's `local-completions` does it, against a server
started here with and without the prefix cache: each choice is a `/v1/completions` request of its
question's context and the choice, `echo` with `logprobs: 1` and `max_tokens: 1`, `--concurrency` in
flight; the choice whose tokens score highest is the answer. The contexts share a few-shot preamble
(as a task's description and fixed shots do), and a question's choices share its context.

    python benchmarks/eval_scoring.py --questions 40 --shots 8 --runs 3

Reports each server's wall time per run and its answers (they must agree: the cache changes no score
beyond float noise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_vs_mlx_lm_server import free_port, wait_healthy

COUNTRIES = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Mexico", "Mexico City"),
    ("Belgium", "Brussels"), ("Czechia", "Prague"), ("Romania", "Bucharest"), ("Ukraine", "Kyiv"),
    ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"),
    ("Australia", "Canberra"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Pakistan", "Islamabad"),
]  # fmt: skip
DESCRIPTION = (
    "The following are multiple choice questions about world geography. Each asks for the capital "
    "city of a country. A capital is the city where the national government sits; it is not always the "
    "largest city of the country, and several countries have moved their capital in the last century. "
    "Answer with the name of the city.\n\n"
)


def tasks(num_questions: int, num_shots: int, seed: int) -> list[tuple[str, list[str], int]]:
    """(context, choices, index of the right one) per question; the shots are the same for all."""
    rng = random.Random(seed)
    shots = COUNTRIES[:num_shots]
    preamble = DESCRIPTION + "".join(f"The capital of {c} is {city}.\n" for c, city in shots)
    pool = COUNTRIES[num_shots:]
    out = []
    for i in range(num_questions):
        country, city = pool[i % len(pool)]
        wrong = rng.sample([c for _, c in COUNTRIES if c != city], 3)
        choices = [city, *wrong]
        rng.shuffle(choices)
        out.append((f"{preamble}The capital of {country} is", choices, choices.index(city)))
    return out


async def score(session: aiohttp.ClientSession, url: str, model: str, context: str, choice: str) -> float:
    """The sum of the choice's token logprobs given the context (lm-evaluation-harness's loglikelihood)."""
    body = {"model": model, "prompt": context + " " + choice, "echo": True, "logprobs": 1, "max_tokens": 1,
            "temperature": 0}  # fmt: skip
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        logprobs = (await response.json())["choices"][0]["logprobs"]
    offsets, values = logprobs["text_offset"], logprobs["token_logprobs"]
    # The echoed prompt's tokens, then the one generated: sum those starting at or after the choice.
    start = len(context)
    return sum(
        v for offset, v in zip(offsets[:-1], values[:-1], strict=True) if offset >= start and v is not None
    )


async def run_all(
    base_url: str, model: str, items: list[tuple[str, list[str], int]], concurrency: int
) -> list[int]:
    url = f"{base_url}/v1/completions"
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:

        async def one(context: str, choice: str) -> float:
            async with limit:
                return await score(session, url, model, context, choice)

        # Every choice of every question at once, in order: lm-evaluation-harness sends them so.
        scores = await asyncio.gather(*(one(ctx, c) for ctx, choices, _ in items for c in choices))
    answers, at = [], 0
    for _, choices, _ in items:
        mine = scores[at : at + len(choices)]
        answers.append(max(range(len(choices)), key=mine.__getitem__))
        at += len(choices)
    return answers


def start_server(model: str, extra: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "batchlm.cli", "serve", "--model", model, "--port", str(port), *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_healthy(port, process, log)
    return process, f"http://127.0.0.1:{port}"


def served_model(base_url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=10) as reply:
        return str(json.load(reply)["data"][0]["id"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4, help="lm-evaluation-harness's num_concurrent")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve-arg", action="append", default=[], help="passed to both servers")
    args = parser.parse_args()
    items = tasks(args.questions, args.shots, seed=0)
    settings = {"prefix cache": [], "no prefix cache": ["--no-prefix-caching"]}
    times: dict[str, list[float]] = {name: [] for name in settings}
    answers: dict[str, list[int]] = {}
    for run in range(args.runs):
        for name, extra in settings.items():  # a fresh server a run, alternating: nothing cached before
            log = Path(tempfile.gettempdir()) / f"eval_scoring_{os.getpid()}.log"
            process, base = start_server(args.model, [*extra, *args.serve_arg], log)
            try:
                started = time.perf_counter()
                got = asyncio.run(run_all(base, served_model(base), items, args.concurrency))
                times[name].append(time.perf_counter() - started)
            finally:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(60)
            answers.setdefault(name, got)
            accuracy = sum(a == right for a, (_, _, right) in zip(got, items, strict=True)) / len(items)
            print(
                json.dumps(
                    {"run": run, "server": name, "seconds": round(times[name][-1], 2), "accuracy": accuracy}
                )
            )
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "questions": args.questions, "requests": sum(len(c) for _, c, _ in items),
        "median_s": {name: round(value, 2) for name, value in medians.items()},
        "speedup": round(medians["no prefix cache"] / medians["prefix cache"], 2),
        "same_answers": answers["prefix cache"] == answers["no prefix cache"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
