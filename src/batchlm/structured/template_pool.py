"""The compiled templates of one grammar that new sequences copy, and the backend-wide budget of
extra templates (several templates of one grammar let its sequences' masks run in parallel)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import llguidance


class TemplateBudget:
    """How many more extra templates the backend may compile (EXTRA_TEMPLATES in all)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give_back(self, count: int) -> None:
        self.used -= count


class TemplatePool:
    """Pristine matchers of one grammar that new sequences deep-copy, in turn. Copies of a template
    share its lexer behind one lock, so masks of many copies of one template do not run in parallel
    (BENCHMARKS.md): a grammar used by many sequences is compiled up to `size` times, while the
    backend's budget allows: each template the first time a sequence needs one (`grow_on_copy`), or,
    where grammars are prepared off the engine thread, one more at each `LLGuidanceBackend.prepare`."""

    def __init__(
        self, compile_one: Callable[[], llguidance.LLMatcher], size: int, budget: TemplateBudget
    ) -> None:
        self._compile_one = compile_one
        self._budget = budget
        self.size = max(1, size)
        self.templates = [compile_one()]  # compiled now: a grammar that fails, fails at once
        self._turn = 0
        self._released = False

    def copy(self, grow_on_copy: bool = True) -> tuple[llguidance.LLMatcher, int]:
        """A fresh matcher and the number of the template it came from."""
        family = self._turn % self.size
        self._turn += 1
        if grow_on_copy and family == len(self.templates) and self._budget.take():
            self.templates.append(self._compile_one())
        family %= len(self.templates)
        return self.templates[family].deep_copy(), family

    def has_room(self) -> bool:
        return len(self.templates) < self.size and self._budget.used < self._budget.limit

    def take_room(self) -> bool:
        """Whether one more template may be compiled (its budget then taken: `add` or `give_back`)."""
        return len(self.templates) < self.size and self._budget.take()

    def compile_one(self) -> llguidance.LLMatcher:
        return self._compile_one()

    def add(self, template: llguidance.LLMatcher) -> None:
        if self._released:  # evicted while it was compiled: its budget went back without it
            self._budget.give_back(1)
            return
        self.templates.append(template)

    def give_back(self) -> None:
        self._budget.give_back(1)

    def release(self) -> None:
        """Evicted from the cache: its extra templates go back to the budget."""
        self._released = True
        self._budget.give_back(len(self.templates) - 1)
