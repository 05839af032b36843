"""Writing files so that a reader never sees half of one: atomic writes of text, bytes and
safetensors, strict JSON (an undefined figure is null, not NaN) and a writability check made
before any long work starts. Every module that writes a result goes through here."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

from stagewise.errors import RunError


def atomic_write_with(path: Path, write: Callable[[Path], object], mode: int | None = None) -> None:
    """Make `path` by `write(temporary path)` and a rename: readers see the old or the new
    file, never a part, and an interrupted write leaves no temporary file behind. `mode`
    (e.g. 0o600 for a private key) is set before the file appears. A failure (disk full,
    read-only folder) is a `RunError` naming the path."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RunError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Write text (UTF-8) or bytes to `path` atomically (see `atomic_write_with`)."""
    if isinstance(data, bytes):
        atomic_write_with(path, lambda tmp: tmp.write_bytes(data), mode)
    else:
        atomic_write_with(path, lambda tmp: tmp.write_text(data, encoding="utf-8"), mode)


def atomic_save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save named tensors as safetensors atomically (see `atomic_write_with`)."""
    from safetensors.torch import save_file

    atomic_write_with(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                  metadata=metadata))


def check_writable(folder: Path) -> None:
    """Fail before any training when `folder` cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        raise RunError(f"cannot write into {folder}: {err.strerror or err}. Choose another output directory.") from None


def strict_json(data) -> str:
    """JSON text as every results file is written: an undefined figure (NaN) is null."""
    return json.dumps(_nan_to_null(data), indent=2, allow_nan=False)


def _nan_to_null(value):
    """Strict JSON: an undefined metric (AUROC of a one-class fold) is null, not NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(v) for v in value]
    return value
