"""pytest-ckptparity: assert that two model checkpoints hold the same model.

Public names load lazily (PEP 562): the pytest plugin lives in this package and is imported
in every pytest run of our users, so importing the package must cost next to nothing. numpy
loads on first use of a public name; jax, flax, orbax and tensorstore only when a checkpoint
is opened.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "assert_ckpt_parity": "api",
    "compare_checkpoints": "api",
    "Comparison": "api",
    "TrajectoryComparison": "api",
    "TrajectoryReport": "trajectory",
    "open_checkpoint": "api",
    "Checkpoint": "sources",
    "CkptParityError": "errors",
    "CkptParityUsageError": "errors",
    "CkptParityWarning": "errors",
    "ParityReport": "_model",
    "LeafResult": "_model",
    "ValueStats": "_model",
    "Tolerance": "_model",
    "DEFAULT_TOLERANCES": "diff",
    "Layout": "normalize",
    "TreeFacts": "normalize",
    "register_layout": "normalize",
    "unregister_layout": "normalize",
    "known_layouts": "normalize",
    "render": "report",
    "assert_ckpt_fingerprint": "api",
    "take_fingerprint": "api",
    "write_fingerprint": "fingerprint",
    "read_fingerprint": "fingerprint",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_ckptparity' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pytest_ckptparity.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from pytest_ckptparity._model import LeafResult, ParityReport, Tolerance, ValueStats
    from pytest_ckptparity.api import (
        Comparison, TrajectoryComparison, assert_ckpt_fingerprint, assert_ckpt_parity, compare_checkpoints, open_checkpoint,
        take_fingerprint,
    )
    from pytest_ckptparity.trajectory import TrajectoryReport
    from pytest_ckptparity.diff import DEFAULT_TOLERANCES
    from pytest_ckptparity.errors import CkptParityError, CkptParityUsageError, CkptParityWarning
    from pytest_ckptparity.fingerprint import read_fingerprint, write_fingerprint
    from pytest_ckptparity.normalize import Layout, TreeFacts, known_layouts, register_layout, unregister_layout
    from pytest_ckptparity.report import render
    from pytest_ckptparity.sources import Checkpoint
