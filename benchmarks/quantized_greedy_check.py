"""Greedy text of a GGUF model through the quantized CPU kernels against the same file dequantized to
float32 (BATCHLM_CPU_KERNELS=0, in a second process), over a fixed prompt set.

    python benchmarks/quantized_greedy_check.py --model SmolLM2-135M-Instruct.Q4_1.gguf --max-tokens 48

Prints, per prompt, whether the two texts are identical and, where not, the first differing token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three fruits that are red.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to code.",
]


def generate(model: str, max_tokens: int) -> list[list[int]]:
    from batchlm import LLM, SamplingParams

    llm = LLM(model=model, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    messages = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    outputs = llm.chat(messages, params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--emit", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emit:
        print(json.dumps(generate(args.model, args.max_tokens)))
        return 0
    command = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--max-tokens",
        str(args.max_tokens),
        "--emit",
    ]
    runs = {}
    for name, kernels in (("quantized", "1"), ("dequantized", "0")):
        env = {**os.environ, "BATCHLM_CPU_KERNELS": kernels}
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        runs[name] = json.loads(out.strip().splitlines()[-1])
    same = 0
    for prompt, ours, reference in zip(PROMPTS, runs["quantized"], runs["dequantized"], strict=True):
        first = next((i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b), None)
        same += ours == reference
        print(json.dumps({"prompt": prompt, "identical": ours == reference, "first_difference": first}))
    print(json.dumps({"identical": same, "prompts": len(PROMPTS)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
