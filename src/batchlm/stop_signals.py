"""Signals that stop processes: ignored by the processes of a server that leave that decision to its
front end (the engine core, tensor-parallel workers), raised as Ctrl-C in commands, and kept from
multiprocessing's resource tracker through a terminal's hangup."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


def ignore_stop_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP ignored by this process (and inherited by the children it starts)."""
    for signum in stop_signals():  # a SIGHUP it leaves out is ignored already
        signal.signal(signum, signal.SIG_IGN)


def stop_signals() -> tuple[int, ...]:
    """The signals that stop this process gracefully: SIGINT, SIGTERM, and SIGHUP (the terminal
    closed) unless it is ignored (`nohup`: the process should outlive the terminal)."""
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None or signal.getsignal(hangup) is signal.SIG_IGN:
        return (signal.SIGINT, signal.SIGTERM)
    return (signal.SIGINT, signal.SIGTERM, hangup)


def start_resource_tracker_past_hangup() -> None:
    """Start multiprocessing's resource tracker (it unlinks the semaphores of processes that die
    without doing so) with SIGHUP blocked. It ignores SIGINT and SIGTERM, but a closed terminal's
    SIGHUP reaches it with the rest of the process group and ended it under the processes still
    draining: their exits then started a new one, which printed a traceback per semaphore. The
    blocked mask is inherited across its exec; a SIGHUP meanwhile waits for the mask's restoring."""
    hangup = getattr(signal, "SIGHUP", None)
    if hangup is None or not hasattr(signal, "pthread_sigmask"):
        return
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {hangup})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopsAsInterrupts:
    """SIGTERM and SIGHUP (unless ignored, as under nohup) taken as Ctrl-C, in the main thread, so
    that a command ends as Ctrl-C ends it (its engine and worker processes stopped, one line said)
    rather than by the signal's default action; `received` is the first such signal, if one came."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopsAsInterrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in stop_signals():
            if signum != signal.SIGINT and signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        # Through SIGINT's handler, which may hold the interrupt until an engine step ends (LLM's):
        # cut short, a tensor-parallel step stopped the workers as failed ones.
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    def describe(self) -> str:
        """How the command was stopped: "interrupted" (Ctrl-C) or "stopped by SIGTERM"."""
        return "interrupted" if self.received is None else f"stopped by {signal.Signals(self.received).name}"

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it (130 for Ctrl-C)."""
        return 128 + (self.received or signal.SIGINT)
