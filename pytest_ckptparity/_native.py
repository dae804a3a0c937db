"""The optional native kernels: a small C library (`native/*.c`, built at install) loaded
with ctypes.

Why: numpy makes one pass over memory per operation. A fingerprint needs about twenty per
element and a tolerance test about ten, and together they cost more than decoding the
chunks. The C loops read each element once. ctypes releases the GIL during a call, so
pieces still spread over the kernel's thread pool.

Without the library (no C compiler at install time, `CKPTPARITY_NATIVE=0` in the
environment, or a library older than the sources (native/*.c, *.h) beside it or built for
another calling convention) every caller uses its numpy path. Digests and verdicts are the
same either way; float64 statistics agree to rounding (their sums are taken in another order).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path
from typing import Any, Optional

_NAME = "_ckptkernel"
ABI = 2  # native/fingerprint.c `ckpt_kernel_abi()`: a library built from other sources is not used
_OFF = ("0", "no", "false", "off")
_ON = ("", "1", "yes", "true", "on")
_lib: Any = None
_state = ""  # why there is no library: "off", "not built", "stale", "failed to load"

# Element kinds the C loops read (native/fingerprint.c `enum kind`).
FINGERPRINT_KINDS = {"float32": 0, "float64": 1, "bfloat16": 2, "float16": 3}


def _path() -> Optional[Path]:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / (_NAME + suffix)
        if candidate.exists():
            return candidate
    return None


def _switched_off(name: str, meaning: str) -> bool:
    """An on/off environment switch: True when set to off, False when on or unset; any other
    value is a usage error naming the switch and what its values mean."""
    value = os.environ.get(name, "").strip().lower()
    if value in _OFF:
        return True
    if value not in _ON:
        from pytest_ckptparity.errors import CkptParityUsageError

        raise CkptParityUsageError(f"{name} must be {meaning}, got {value!r}.")
    return False


def _turned_off() -> bool:
    return _switched_off("CKPTPARITY_NATIVE", "1 (use the C kernels when built) or 0 (numpy kernels)")


def in_step_turned_off() -> bool:
    """CKPTPARITY_IN_STEP=0: mismatched chunk grids are read in slabs through tensorstore,
    not decoded row by row in step with libzstd (`read_in_step`)."""
    return _switched_off("CKPTPARITY_IN_STEP", "1 (read mismatched chunk grids row by row in step) or 0 (in slabs)")


def check_environment() -> None:
    """Raise the usage error for a CKPTPARITY_NATIVE or CKPTPARITY_IN_STEP that is neither on nor off."""
    _turned_off()
    in_step_turned_off()


def _stale(path: Path, sources: Path = Path(__file__).parent / "native") -> bool:
    """The C sources next to the package (an editable install) are newer than the library:
    it was built from other code (a `git pull` without reinstalling, or a failed rebuild)."""
    files = [*sources.glob("*.c"), *sources.glob("*.h")]
    return bool(files) and max(p.stat().st_mtime for p in files) > path.stat().st_mtime


def _load(path: Path) -> Any:
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.ckpt_kernel_abi
    except (OSError, AttributeError):
        return None
    abi.restype = ctypes.c_int
    abi.argtypes = []
    if abi() != ABI:
        return None
    i64p = ctypes.POINTER(ctypes.c_int64)
    fn = lib.ckpt_fingerprint_piece
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, i64p, i64p, i64p, ctypes.c_uint64,
                   ctypes.POINTER(ctypes.c_double), i64p, ctypes.POINTER(ctypes.c_uint64)]
    fn = lib.ckpt_compare_piece  # kernel.py `_fast_piece`
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_double, ctypes.c_double, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def library() -> Any:
    """The loaded library, or None (turned off, not built, stale or failed to load)."""
    global _lib, _state
    if _turned_off():
        return None
    if _lib is None and not _state:
        path = _path()
        if path is None:
            _state = "not built"
        elif _stale(path):
            _state = "stale"
        else:
            _lib = _load(path)
            _state = "" if _lib is not None else "failed to load"
    return _lib


def status() -> str:
    """A short line for `ckptparity --version`: which kernels this install uses."""
    if _turned_off():
        return "native kernels: off (CKPTPARITY_NATIVE=0)"
    if library() is not None:
        return "native kernels: yes"
    return {
        "not built": "native kernels: not built, numpy used",
        "stale": "native kernels: stale build, numpy used; reinstall",
        "failed to load": "native kernels: failed to load, numpy used",
    }[_state]
