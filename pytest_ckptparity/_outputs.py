"""Files the tool writes (JSON reports, fingerprint files): their paths are checked before any
checkpoint is read, so a typo costs one sentence, not a finished run and a traceback."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_ckptparity.errors import CkptParityUsageError


def check_output_file(path: str, option: str, example: str, thing: str = "file") -> None:
    """A usage error when `path` is empty, is a folder, or lies in a folder that does not
    exist (never created for the user: a typo must not grow folders)."""
    if not str(path).strip():
        raise CkptParityUsageError(f"{option} '': the path is empty; give the {thing} a file name, such as {example!r}.")
    p = Path(path)
    if p.is_dir():
        raise CkptParityUsageError(f"{option} {path!r} is a directory; give a file name such as {os.path.join(path, example)!r}.")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CkptParityUsageError(f"{option} {path!r}: the directory {str(parent)!r} does not exist; create it or write the {thing} elsewhere.")
    if not os.access(parent, os.W_OK):
        raise CkptParityUsageError(f"{option} {path!r}: the directory {str(parent)!r} is not writable; write the {thing} elsewhere.")
