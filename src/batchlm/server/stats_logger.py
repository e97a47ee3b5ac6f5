"""The periodic engine log line: throughput since the last line, queue sizes, KV and prefix-cache use."""

from __future__ import annotations

import asyncio
import logging
import time

from batchlm.engine.client import EngineClient, EngineStats
from batchlm.server.metrics import prefix_cache_hit_rate

logger = logging.getLogger("batchlm.server.stats")


class StatsLogger:
    """Writes one INFO line per interval while the engine has work or produced tokens; silent when idle."""

    def __init__(self, engine: EngineClient, interval_s: float) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._last: EngineStats | None = None
        self._last_time = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                self.log_once()
            except Exception:  # a statistics hiccup must never stop the server
                logger.debug("stats logging failed", exc_info=True)

    def log_once(self) -> str | None:
        """Log and return the line, or None when there was nothing to report."""
        if not self._engine.is_ready:
            return None
        stats = self._engine.stats()
        now = time.monotonic()
        previous = self._last or EngineStats()
        elapsed = max(now - self._last_time, 1e-9)
        self._last, self._last_time = stats, now
        prompt_tokens = stats.prompt_tokens_total - previous.prompt_tokens_total
        generated_tokens = stats.generation_tokens_total - previous.generation_tokens_total
        busy = stats.num_running or stats.num_waiting
        if not (busy or prompt_tokens or generated_tokens):
            return None
        hit_rate = prefix_cache_hit_rate(stats)
        line = (
            f"prompt throughput: {prompt_tokens / elapsed:.1f} tokens/s, "
            f"generation throughput: {generated_tokens / elapsed:.1f} tokens/s, "
            f"running: {stats.num_running} reqs, waiting: {stats.num_waiting} reqs, "
            f"KV cache usage: {stats.kv_cache_usage:.1%}, prefix cache hit rate: {hit_rate:.1%}"
        )
        logger.info(line)
        return line
