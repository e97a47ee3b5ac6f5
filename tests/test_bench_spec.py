"""The bench's input-grounded datasets and its reading of the server's speculative counters."""

from __future__ import annotations

import re

from batchlm.bench.datasets import DATASET_NAMES, grounded_samples
from batchlm.bench.grounded_prompts import grounded_prompts
from batchlm.bench.report import _spec_rows
from batchlm.bench.spec_counters import SpecActivity, SpecCounters, activity_between, parse_spec_counters

METRICS = """# HELP batchlm_spec_proposed_tokens_total Draft tokens verified by speculative decoding.
# TYPE batchlm_spec_proposed_tokens_total counter
batchlm_spec_proposed_tokens_total 120.0
batchlm_spec_accepted_tokens_total 90.0
batchlm_generation_tokens_total 400.0
"""


def test_generated_datasets_are_deterministic_and_distinct() -> None:
    assert {"editing", "summarization"} <= set(DATASET_NAMES)
    for kind in ("editing", "summarization"):
        first, again = grounded_prompts(kind, 8), grounded_prompts(kind, 8)
        assert first == again
        assert len(set(first)) == 8
        assert [s.prompt for s in grounded_samples(kind)][:8] == first


def test_editing_prompt_holds_the_code_its_answer_repeats() -> None:
    prompt = grounded_prompts("editing", 1)[0]
    old, new = re.findall(r"`(\w+)`", prompt)[:2]
    code = prompt.split("```python\n", 1)[1].rsplit("```", 1)[0]
    assert "def " in code and re.search(rf"\b{old}\b", code) and not re.search(rf"\b{new}\b", code)
    compile(code, "<editing>", "exec")  # valid Python: the rename is a real edit


def test_counters_are_parsed_and_differenced() -> None:
    before = parse_spec_counters(METRICS)
    assert before == SpecCounters(proposed=120.0, accepted=90.0)
    after = parse_spec_counters(METRICS.replace("120.0", "220.0").replace("90.0", "170.0"))
    activity = activity_between(before, after)
    assert activity == SpecActivity(proposed=100.0, accepted=80.0)
    assert activity.acceptance_rate == 0.8
    assert "80.0% (80 of 100 draft tokens)" in _spec_rows(activity)[0]


def test_a_server_without_counters_reports_nothing() -> None:
    assert parse_spec_counters("batchlm_generation_tokens_total 4.0\n") is None
    assert activity_between(None, SpecCounters(1.0, 1.0)) is None
    assert _spec_rows(SpecActivity(proposed=0.0, accepted=0.0)) == []
    vllm = 'vllm:spec_decode_num_draft_tokens_total{model_name="m"} 10\nvllm:spec_decode_num_accepted_tokens_total{model_name="m"} 4\n'
    assert parse_spec_counters(vllm) == SpecCounters(proposed=10.0, accepted=4.0)
