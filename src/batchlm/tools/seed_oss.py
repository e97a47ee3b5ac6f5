"""Seed-OSS's calls: Qwen3-Coder's XML inside Seed's own tags, each value written right against its
tags (the model's chat template lays calls out so):

    <seed:tool_call>
    <function=get_weather>
    <parameter=city>Paris</parameter>
    </function>
    </seed:tool_call>

Read, streamed and held to grammars as Qwen3-Coder's are (`qwen3_coder.py`); a value written with a
newline on either side, Qwen3-Coder's way, reads the same."""

from __future__ import annotations

from batchlm.tools.qwen3_coder import CallLayout, Qwen3CoderParser

START, END = "<seed:tool_call>", "</seed:tool_call>"
SEED_OSS = CallLayout(START, END, value_gap="")


class SeedOssParser(Qwen3CoderParser):
    layout = SEED_OSS
    markers = (START, END)
