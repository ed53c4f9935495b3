"""Writing generated checkpoints into the shared cache atomically.

A checkpoint generated on first use (a widened model, a GGUF file dequantized to float) lands in a cache other
processes read, so a crash or ^C must never leave a half-written directory that later loads would trust: it is
written into a temporary directory beside its destination and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["publish_checkpoint"]


def _umask() -> int:
    """The process umask (only readable by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_checkpoint(out: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh directory beside ``out``, then rename it to ``out``. If another process
    published ``out`` first, its copy is kept (generators are deterministic, so both are the same)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's private 0700 would outlive the rename
        write(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
