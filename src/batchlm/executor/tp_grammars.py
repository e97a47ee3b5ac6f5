"""The engine core's GrammarCompiles under tensor parallelism: every rank builds its own matchers, so
every rank compiles the grammar, on its own background threads (its runner's BackgroundCompiles). A
request is ready once every rank has compiled its grammar; the first rank to fail ends it with its
error. A rank announces a finished compile on the news pipe all ranks share, and the core, waiting on
that pipe, then asks every rank which compiles finished (a call answered at once, between steps)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import NoReturn, Protocol

from batchlm.executor.messages import CompileGrammar, DiscardGrammars, GrammarCall, GrammarNews, TakeGrammars
from batchlm.request import EngineCoreRequest


class GrammarRanks(Protocol):
    """The executor, as the compiles use it."""

    @property
    def processes(self) -> Sequence[BaseProcess]: ...

    def call_grammars(self, call: GrammarCall) -> list[GrammarNews]: ...

    def check_health(self) -> None: ...

    def fail(self, reason: str) -> NoReturn: ...


@dataclass
class _Compile:
    request_id: str
    # The ranks that have not reported this compile yet.
    ranks_left: set[int] = field(default_factory=set)


class TensorParallelGrammars:
    """GrammarCompiles over the ranks of a tensor-parallel executor (one thread: the core's)."""

    def __init__(self, ranks: GrammarRanks, news: Connection) -> None:
        """news: the read end of the pipe every rank writes an empty message to per finished compile."""
        self._ranks = ranks
        self._news = news
        # Token (the name the ranks know the compile by) -> the compile, until every rank has it.
        self._compiles: dict[str, _Compile] = {}
        self._token_of: dict[str, str] = {}
        self._done: dict[str, str | None] = {}
        self._next_token = 0
        self._closed = False

    @property
    def wakeup(self) -> Connection:
        return self._news

    def start(self, request: EngineCoreRequest) -> bool:
        spec = request.sampling_params.structured_outputs
        assert spec is not None, "only a constrained request has a grammar to compile"
        if self._closed:
            raise RuntimeError("grammar compiles were closed")
        # A token per compile, not the request id: a rank's late report of an aborted request's
        # compile must not count for a later request that reuses its id.
        token = str(self._next_token)
        self._next_token += 1
        self._compiles[token] = _Compile(request.request_id, set(range(len(self._ranks.processes))))
        self._token_of[request.request_id] = token
        self._merge(self._ranks.call_grammars(CompileGrammar(token, spec, tuple(request.eos_token_ids))))
        if request.request_id in self._done and self._done[request.request_id] is None:
            del self._done[request.request_id]  # compiled before on every rank
            return True
        return False

    def has_done(self) -> bool:
        if self._closed:
            return False
        if self._drain_news() and self._compiles:
            self._merge(self._ranks.call_grammars(TakeGrammars()))
        return bool(self._done)

    def take_done(self) -> dict[str, str | None]:
        self.has_done()
        done, self._done = self._done, {}
        return done

    def wait_done(self) -> None:
        """Waits on the news pipe and on the workers' exits: a worker that dies meanwhile raises
        TensorParallelError (naming its rank) rather than leaving this wait for ever."""
        sentinels = [process.sentinel for process in self._ranks.processes]
        while not self.has_done() and self._compiles and not self._closed:
            ready = wait([self._news, *sentinels])
            if any(each in sentinels for each in ready):
                self._ranks.check_health()

    def discard(self, request_ids: Iterable[str]) -> None:
        tokens: list[str] = []
        for request_id in request_ids:
            self._done.pop(request_id, None)
            token = self._token_of.pop(request_id, None)
            if token is not None:
                del self._compiles[token]
                tokens.append(token)
        if tokens and not self._closed:
            self._merge(self._ranks.call_grammars(DiscardGrammars(tuple(tokens))))

    def close(self) -> None:
        """Forget every request; the ranks' compiles end with the workers."""
        self._closed = True
        self._compiles.clear()
        self._token_of.clear()
        self._done.clear()

    def _merge(self, answers: list[GrammarNews]) -> None:
        """Fold in each rank's finished compiles (in rank order: of ranks failing in one answer, the
        lowest names the error)."""
        for rank, news in enumerate(answers):
            for token, error in news.done.items():
                compile_ = self._compiles.get(token)
                if compile_ is None:
                    continue  # discarded, or failed on another rank already
                compile_.ranks_left.discard(rank)
                if error is not None or not compile_.ranks_left:
                    del self._compiles[token]
                    del self._token_of[compile_.request_id]
                    self._done[compile_.request_id] = error

    def _drain_news(self) -> bool:
        """Read every announcement so far (so that the pipe is readable only for news after the
        TakeGrammars that follows); whether there were any."""
        had_news = False
        try:
            while self._news.poll():
                self._news.recv_bytes()
                had_news = True
        except (EOFError, OSError):
            # Every worker has gone (only they write to it): say which.
            self._ranks.check_health()
            self._ranks.fail("the tensor-parallel workers closed their grammar news pipe")
        return had_news
