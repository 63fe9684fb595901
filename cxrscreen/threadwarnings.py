"""The warnings one thread raises, caught without touching the other threads'.

cxrscreen reads and decodes files in several threads, and a warning is how pydicom says a file is
truncated or a value had to be replaced. ``warnings.catch_warnings`` cannot catch them there: before
Python 3.14 it swaps process-wide state (the filter list and the function that shows a warning) on
entry and puts back what it saw on exit, so two threads whose blocks overlap take each other's warnings
and the last one out can leave a finished block's recorder installed. Both happened in a batch: with
four threads reading good and truncated files, a good file failed as truncated 84 times in 420 reads,
and after a run every later warning of the process went to a list nobody read.

:func:`caught` installs one filter and one ``showwarning`` hook instead, once, and they act only on a
thread that is inside ``caught()``; every other thread's warnings go where they went before. The filter's
message pattern is an object whose ``match`` asks the thread (the warnings module calls ``match`` on
it, in C as in Python), and its action is "always", so a warning inside ``caught()`` reaches the hook
however often it was raised before. A ``catch_warnings`` block elsewhere (a test runner, a library)
that puts its old state back removes them: the next ``caught()`` puts them back in place. While such a
block runs in another thread, its filters and recorder win, as they do for any code; cxrscreen itself
no longer uses ``catch_warnings``.
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

_local = threading.local()
_install = threading.Lock()


class _InsideCaught:
    """Stands where a filter has its message pattern: matches every warning raised in a thread inside
    :func:`caught`, and no other."""

    def match(self, text: str) -> bool:
        return bool(getattr(_local, "lists", None))

    def __repr__(self) -> str:
        return "<a warning raised inside cxrscreen.threadwarnings.caught()>"


_FILTER = ("always", _InsideCaught(), Warning, None, 0)
_shown_before = warnings.showwarning


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    lists = getattr(_local, "lists", None)
    if lists:
        lists[-1].append(warnings.WarningMessage(message, category, filename, lineno, file, line))
    else:
        _shown_before(message, category, filename, lineno, file, line)


def _forget_warnings_shown_once() -> None:
    """Void every module's record of the warnings it has shown once (the filters' version goes up, as when
    a filter is added): the warnings module skips a warning found there before it looks at any filter."""
    mutated = getattr(warnings, "_filters_mutated", None)           # private; there in Python 3.10 to 3.14
    if mutated is not None:
        mutated()


def _put_in_place() -> None:
    global _shown_before
    with _install:
        if warnings.showwarning is not _show:
            _shown_before = warnings.showwarning
            warnings.showwarning = _show
        filters = warnings.filters
        if not filters or filters[0] is not _FILTER:
            while _FILTER in filters:
                filters.remove(_FILTER)
            filters.insert(0, _FILTER)
    _forget_warnings_shown_once()


@contextmanager
def caught() -> Iterator[list[warnings.WarningMessage]]:
    """Collect every warning this thread raises inside the block, in order, into the list it yields: none
    is shown, each is collected however often it was raised before; other threads are not affected.
    Blocks nest: a warning goes to the innermost."""
    _put_in_place()
    lists = getattr(_local, "lists", None)
    if lists is None:
        lists = _local.lists = []
    mine: list[warnings.WarningMessage] = []
    lists.append(mine)
    try:
        yield mine
    finally:
        lists.pop()


def listed(seen: list[warnings.WarningMessage], shown: int = 3) -> str:
    """``seen`` for a log line: "N warning(s): " and the first ``shown`` different ones, each in one short line."""
    texts = list(dict.fromkeys(_one_line(str(w.message)) for w in seen))
    more = f"; and {len(texts) - shown} more" if len(texts) > shown else ""
    return f"{len(texts)} warning{'s' if len(texts) != 1 else ''}: {'; '.join(texts[:shown])}{more}"


def _one_line(text: str, limit: int = 160) -> str:
    """One warning in at most ``limit`` printable characters, without pydicom's pointer to the standard."""
    text = text.split(" Please see <", 1)[0].encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
