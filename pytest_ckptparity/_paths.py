"""Canonical key paths and the glob language users write over them.

A path is a tuple of str keys (list indices become digit strings, as orbax writes them);
its display form joins keys with '/'. Globs: `*` and `?` stay within one key, `**` crosses
'/', `[...]` is a character class.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Sequence

KeyPath = tuple[str, ...]


def path_str(path: Sequence[str]) -> str:
    return "/".join(str(k) for k in path)


@functools.lru_cache(maxsize=4096)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_match(path: str, pattern: str) -> bool:
    """True when `pattern` matches the whole of `path`, or `path` lies under a matching folder."""
    rx = _glob_regex(pattern.rstrip("/"))
    if rx.match(path):
        return True
    # A pattern naming a subtree ("opt_state") selects everything below it.
    parts = path.split("/")
    return any(rx.match("/".join(parts[:n])) for n in range(1, len(parts)))


def any_match(path: str, patterns: Iterable[str]) -> bool:
    return any(glob_match(path, p) for p in patterns)


def in_scope(path: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include and not any_match(path, include):
        return False
    return not (exclude and any_match(path, exclude))
