"""What a host sets for every comparison of the process: who hears of each finished
comparison, and how many mismatch rows an error message shows.

The pytest plugin sets both in every session, including sessions that never touch a
checkpoint, so they live here rather than in `api`: importing `api` loads numpy and the
comparison machinery, which a run that compares nothing must not pay for.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

DEFAULT_MAX_ROWS = 20

# Observers of every finished comparison (the pytest plugin counts them for its summary).
listeners: list[Callable[[Any], None]] = []

# Mismatch rows in a CkptParityError's message; the plugin follows pytest's verbosity
# (20, 50 with -v, every row with -vv). None: every row.
max_rows: Optional[int] = DEFAULT_MAX_ROWS


def add_report_listener(fn: Callable[[Any], None]) -> None:
    listeners.append(fn)


def remove_report_listener(fn: Callable[[Any], None]) -> None:
    if fn in listeners:
        listeners.remove(fn)
