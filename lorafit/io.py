"""Atomic file writes: write to a temporary file in the same folder, then rename.

A crash never leaves a half-written file behind; readers see the old file or the new one.
Written files get the permissions a plain open() would give (0o666 less the umask), not the
owner-only 0o600 of a temporary file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it is renamed onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, default_mode(is_dir=False))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def default_mode(*, is_dir: bool) -> int:
    """The mode open() (0o666) or mkdir() (0o777) would give under the current umask."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def give_default_modes(root: Path) -> None:
    """chmod `root` and everything under it as open()/mkdir() would have made them.

    Temporary folders are owner-only (0o700) and safetensors writes 0o600 files; a run or an
    export must be readable by whoever the umask lets read a plain file.
    """
    for entry in [root, *root.rglob("*")]:
        os.chmod(entry, default_mode(is_dir=entry.is_dir()))


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON: NaN and infinities (e.g. AUROC with one class present) are written as null."""
    text = json.dumps(_nan_to_null(obj), indent=2, default=_json_default, allow_nan=False)
    write_text(path, text + "\n")


def _nan_to_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _nan_to_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_null(value) for value in obj]
    return obj


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically write `path` with `writer(tmp_path)` (e.g. savefig, save_file)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one strict JSON line (NaN -> null, as write_json); a single write + fsync so a
    crash loses at most that line."""
    line = json.dumps(_nan_to_null(obj), default=_json_default, allow_nan=False) + "\n"
    with open(path, "a") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file, ignoring a torn last line left by a crash."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
