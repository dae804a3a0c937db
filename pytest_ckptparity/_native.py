"""The optional native kernels: a small C library (`native/*.c`, built at install) loaded
with ctypes.

Why: numpy makes one pass over memory per operation. A fingerprint needs about twenty per
element and a tolerance test about ten, and together they cost more than decoding the
chunks. The C loops read each element once. ctypes releases the GIL during a call, so
pieces still spread over the kernel's thread pool.

Without the library (no C compiler at install time, or `CKPTPARITY_NATIVE=0` in the
environment) every caller uses its numpy path. Digests and verdicts are the same either
way; float64 statistics agree to rounding (their sums are taken in another order).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path
from typing import Any, Optional

_NAME = "_ckptkernel"
_lib: Any = None
_loaded = False

# Element kinds the C fingerprint loop reads (native/fingerprint.c `enum kind`).
FINGERPRINT_KINDS = {"float32": 0, "float64": 1, "bfloat16": 2, "float16": 3}


def _path() -> Optional[Path]:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / (_NAME + suffix)
        if candidate.exists():
            return candidate
    return None


def library() -> Any:
    """The loaded library, or None (not built, failed to load, or turned off)."""
    global _lib, _loaded
    if os.environ.get("CKPTPARITY_NATIVE", "1").strip().lower() in ("0", "no", "false", "off"):
        return None
    if not _loaded:
        _loaded = True
        path = _path()
        if path is not None:
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                lib = None
            if lib is not None:
                i64p = ctypes.POINTER(ctypes.c_int64)
                fn = lib.ckpt_fingerprint_piece
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, i64p, i64p, i64p, ctypes.c_uint64,
                               ctypes.POINTER(ctypes.c_double), i64p, ctypes.POINTER(ctypes.c_uint64)]
                fn = getattr(lib, "ckpt_compare_piece", None)  # kernel.py `_fast_piece`; None in an older build
                if fn is not None:
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                   ctypes.c_int64, ctypes.c_int64, ctypes.c_double, ctypes.c_double, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                _lib = lib
    return _lib


def status() -> str:
    """One line for `ckptparity --version`: which kernels this install uses."""
    if library() is not None:
        return "native kernels: yes"
    if os.environ.get("CKPTPARITY_NATIVE", "1").strip().lower() in ("0", "no", "false", "off"):
        return "native kernels: off (CKPTPARITY_NATIVE=0): numpy kernels"
    return "native kernels: not built (no C compiler at install): numpy kernels, same verdicts, slower"
