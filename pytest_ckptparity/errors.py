"""The two ways a comparison can end badly: a verdict, or a usage problem.

Kept apart because they mean different things to a CI run: `CkptParityError` is a parity
verdict (the checkpoints differ), `CkptParityUsageError` means no verdict could be given
(bad path, damaged checkpoint, bad option). Both carry one sentence a user can act on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pytest_ckptparity._model import ParityReport


class CkptParityError(AssertionError):
    """The checkpoints differ; `.report` holds every mismatch."""

    __module__ = "pytest_ckptparity"  # tracebacks and pytest's short summary show the public name

    def __init__(self, message: str, report: "ParityReport") -> None:
        super().__init__(message)
        self.report = report


class CkptParityUsageError(Exception):
    """No verdict: a path, checkpoint or option is unusable. The message says what to do."""

    __module__ = "pytest_ckptparity"

    def __init__(self, message: str, *, path: Any = None) -> None:
        super().__init__(message)
        self.path = path


class CkptParityWarning(UserWarning):
    """A comparison ran, but something about it deserves a look (e.g. a newer step of a
    manager root is not committed, so an older one was compared)."""

    __module__ = "pytest_ckptparity"
