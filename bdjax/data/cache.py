"""On-disk cache of decoded datasets: decoding 60k JPEGs takes seconds, loading one .npz a fraction of that."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from bdjax.data.dataset import Dataset, validate_dataset
from bdjax.data.npz import write_npz

_FORMAT = "bdjax-cache-v2"  # bump when a reader's output changes, so old caches stop matching (v2: 16-bit PNGs scaled)
_KEYS = ("x_train", "y_train", "x_test", "y_test", "class_names")


def default_cache_dir() -> Path:
    env = os.environ.get("BDJAX_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bdjax"


def file_stats(files: Iterable[Path | str]) -> list[tuple[str, int, int]]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return out


def fingerprint(source: Path, stats: Iterable[tuple[str, int, int]]) -> str:
    """Hash of the source's absolute path and each file's (path, size, mtime): edits invalidate the cache."""
    h = hashlib.sha256(f"{_FORMAT}\0{source.resolve()}".encode())
    h.update("".join(f"\0{p}\0{size}\0{mtime}" for p, size, mtime in stats).encode())
    return h.hexdigest()[:24]


def _cache_path(cache_dir: Path, name: str, source: Path, key: str) -> Path:
    src = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
    return cache_dir / f"{safe}-{src}-{key}.npz"


def _read(path: Path, name: str) -> Dataset | None:
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in _KEYS}
    except Exception:  # missing, truncated or corrupt: the caller rebuilds it
        return None
    return Dataset(name, arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                   tuple(str(s) for s in arrays["class_names"].tolist()))


def _write(path: Path, ds: Dataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_npz(f, ds)
        os.replace(tmp, path)  # atomic: a reader never sees a half-written cache
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Older caches of the same source (before the data was edited) are dead weight.
    for old in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.npz"):
        if old != path:
            old.unlink(missing_ok=True)


def cached(name: str, source: Path, stats: Iterable[tuple[str, int, int]], build: Callable[[], Dataset],
           cache_dir: Path | None = None) -> Dataset:
    """Return the cached dataset for source (whose files have these stats) if valid, else build and cache it."""
    path = _cache_path(cache_dir or default_cache_dir(), name, source, fingerprint(source, stats))
    ds = _read(path, name)
    if ds is not None:
        try:
            validate_dataset(ds)
            return ds
        except ValueError:  # a cache that decodes but is inconsistent is as good as corrupt
            pass
    ds = build()
    validate_dataset(ds)
    try:
        _write(path, ds)
    except OSError as e:  # an unwritable cache dir should slow things down, not fail the run
        warnings.warn(f"bdjax: could not write dataset cache {path}: {e}", stacklevel=3)
    return ds
