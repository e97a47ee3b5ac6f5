"""batchlm.startup_log: one `startup:` INFO line per completed phase, none for a failed one; process uptime."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from batchlm.startup_log import PREFIX, log_phase, log_uptime, process_uptime_s, timed_phase

LOGGER = logging.getLogger("test.startup")


def startup_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(PREFIX)]


def test_log_phase_formats_name_seconds_and_detail(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        log_phase(LOGGER, "CUDA graphs", 1.234, "20 sizes")
        log_phase(LOGGER, "model build", 0.5)
    assert startup_lines(caplog) == ["startup: CUDA graphs 1.23 s (20 sizes)", "startup: model build 0.50 s"]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_timed_phase_logs_once_with_the_block_time(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER.name), timed_phase(LOGGER, "profile run"):
        time.sleep(0.02)
    (line,) = startup_lines(caplog)
    name, seconds = line.removeprefix("startup: ").rsplit(" ", 2)[:2]
    assert name == "profile run"
    assert float(seconds) >= 0.02


def test_timed_phase_logs_nothing_when_the_block_raises(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger=LOGGER.name),
        pytest.raises(RuntimeError, match="boom"),
        timed_phase(LOGGER, "model build"),
    ):
        raise RuntimeError("boom")
    assert startup_lines(caplog) == []


def test_phase_lines_are_info_so_warning_level_hides_them(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER.name), timed_phase(LOGGER, "tokenizer"):
        pass
    assert startup_lines(caplog) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_process_uptime_counts_from_process_start() -> None:
    uptime = process_uptime_s()
    assert uptime is not None
    # This process imported pytest and torch-free modules before the test: it has been up a while,
    # and /proc's clock ticks are 10 ms, so the value is non-negative and grows with real time.
    assert uptime >= 0.0
    time.sleep(0.05)
    later = process_uptime_s()
    assert later is not None and later >= uptime + 0.03


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_log_uptime_names_the_moment(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        log_uptime(LOGGER, "front end: ready")
    (line,) = startup_lines(caplog)
    assert line.startswith("startup: front end: ready ") and line.endswith(" s after process start")


def test_process_uptime_is_none_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(*_: object, **__: object) -> None:
        raise FileNotFoundError("/proc/self/stat")

    monkeypatch.setattr("builtins.open", no_proc)
    assert process_uptime_s() is None
