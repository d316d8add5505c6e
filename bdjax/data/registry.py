"""Resolve a dataset name to a source (digits, a local folder or .npz, or TFDS) and load it."""

from __future__ import annotations

import os
from pathlib import Path

from bdjax.data import cache, folder, idx, npz, tfds_source
from bdjax.data.dataset import Dataset, validate_dataset
from bdjax.data.digits import load_digits
from bdjax.errors import DataError

_REPO_ROOT = Path(__file__).resolve().parents[2]  # bdjax/data/registry.py -> the repo holding bdjax/


def default_data_root() -> Path | None:
    """$BDJAX_DATA_ROOT, else ../shared/datasets next to the repo (or the working dir), else None."""
    env = os.environ.get("BDJAX_DATA_ROOT")
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"BDJAX_DATA_ROOT={env!r} is not an existing directory")
        return root
    for base in (_REPO_ROOT, Path.cwd()):
        candidate = base.parent / "shared" / "datasets"
        if candidate.is_dir():
            return candidate
    return None


def _is_path_like(name: str) -> bool:
    return name.endswith(".npz") or "/" in name or os.sep in name or name.startswith(("~", "."))


def _find_local(name: str, data_root: str | None) -> Path | None:
    """The local source for name: an explicit path, or <root>/<name>[.npz]; None means try TFDS."""
    if _is_path_like(name):
        path = Path(name).expanduser()
        if path.exists():
            return path
        # TFDS names may hold a "/" (e.g. "imagenet2012_subset/1pct"); anything else path-like must exist.
        if name.endswith(".npz") or name.startswith(("/", "~", ".")):
            raise DataError(f"dataset path {name!r} does not exist")
    if data_root is not None:
        root: Path | None = Path(data_root).expanduser()
        if not root.is_dir():
            raise DataError(f"data_root {data_root!r} is not an existing directory")
    else:
        root = default_data_root()
    if root is None:
        return None
    for candidate in (root / name, root / f"{name}.npz"):
        if candidate.exists():
            return candidate
    return None


def _npz_in(directory: Path) -> Path:
    own = directory / f"{directory.name}.npz"
    if own.is_file():
        return own
    found = sorted(directory.glob("*.npz"))
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(f"{directory}: {len(found)} .npz files ({', '.join(f.name for f in found)}); "
                        f"expected one, or one named {directory.name}.npz")
    raise DataError(f"{directory}: no dataset found (expected IDX *-idx3-ubyte[.gz] files, "
                    "train/ and test/ class folders, or one .npz file)")


def load_local(path: Path, name: str, cache_dir: str | None = None) -> Dataset:
    """Detect the format of a local file or folder and read it, through the cache for slow formats."""
    cdir = Path(cache_dir).expanduser() if cache_dir else None
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{path}: unsupported dataset file, expected a .npz file or a folder")
        ds = npz.read_npz(path, name)  # already fast to load: no cache
    elif idx.looks_like_idx_dir(path):
        files = idx.idx_files(path)

        def build_idx() -> Dataset:
            a = idx.read_idx_dir(path)
            top = max(int(a["y_train"].max(initial=0)), int(a["y_test"].max(initial=0)))
            names = tuple(str(i) for i in range(max(top + 1, 1)))
            return Dataset(name, a["x_train"], a["y_train"], a["x_test"], a["y_test"], names)

        ds = cache.cached(name, path, cache.file_stats(sorted(files.values())), build_idx, cdir)
    elif folder.looks_like_folder_dir(path):
        scan = folder.scan_folder(path)  # layout errors surface even when a cache exists

        def build_folder() -> Dataset:
            a = folder.decode_folder(scan)
            return Dataset(name, a["x_train"], a["y_train"], a["x_test"], a["y_test"], scan.class_names)

        ds = cache.cached(name, path, scan.stats, build_folder, cdir)
    else:
        ds = npz.read_npz(_npz_in(path), name)
    validate_dataset(ds)
    return ds


def load_dataset(name: str, *, data_root: str | None = None, data_dir: str | None = None,
                 cache_dir: str | None = None) -> Dataset:
    """Load a dataset by name: "digits", a folder/.npz under the data root, an explicit path, or a TFDS name.

    data_root overrides default_data_root(); data_dir is TFDS's download dir; cache_dir holds decoded caches.
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"dataset name must be a non-empty string, got {name!r}")
    if name == "digits":
        return load_digits()
    local = _find_local(name, data_root)
    if local is not None:
        label = name if not _is_path_like(name) else local.stem if local.is_file() else local.resolve().name
        return load_local(local, label, cache_dir)
    return tfds_source.load_tfds(name, data_dir)
