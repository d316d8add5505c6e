"""A zoo on disk: `manifest.json` (one record per model, the chunk table, the config) and one orbax checkpoint
per chunk of models (parameters and batch statistics stacked along a leading model axis).

    zoo/manifest.json
    zoo/chunks/00000/model/...       complete chunk: stacked variables (orbax, no pickle)
    zoo/chunks/00001/train/<step>/   chunk being trained: population checkpoints (resume after a kill)

A chunk counts as complete only once its variables are written AND the manifest says so (the manifest is
replaced atomically after orbax has finished), so a zoo killed mid-save resumes from the last complete chunk
(and the unfinished chunk from its last training checkpoint). Loading validates the manifest, names a missing or
unreadable chunk, and never executes anything from the files.

With several processes (bdjax.distributed) every process holds the same manifest in memory and calls the same
methods; only process 0 writes the manifest and removes folders, and orbax saves are collective (each process
takes part; orbax writes the gathered numpy variables from process 0).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from bdjax import distributed
from bdjax.config import matches_saved, saved_form
from bdjax.errors import CheckpointError, ConfigError
from bdjax.results import write_json
from bdjax.zoo.plan import ModelRecord, record_from_dict

FORMAT = "bdjax-zoo/1"


RESULT_FIELDS = ("clean_acc", "asr", "val_acc", "val_asr", "kept")  # filled in by training; the rest of a record is the plan


def _plan_fields(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in RESULT_FIELDS}


def _bounds(chunks: list[dict]) -> list[tuple[int, int]]:
    return [(c["start"], c["stop"]) for c in chunks]


def _chunk_table(n_models: int, chunk_size: int) -> list[dict]:
    return [{"index": c, "start": s, "stop": min(s + chunk_size, n_models), "complete": False}
            for c, s in enumerate(range(0, n_models, chunk_size))]


class ZooStore:
    def __init__(self, root: str | Path, manifest: dict):
        self.root = Path(root).absolute()
        self.manifest = manifest

    # ------------------------------------------------------------------ creation and opening
    @classmethod
    def create(cls, root, records: list[ModelRecord], chunk_size: int, config) -> "ZooStore":
        if chunk_size < 1:
            raise ConfigError(f"zoo chunk_size must be >= 1, got {chunk_size}")
        manifest = {"format": FORMAT, "config": saved_form(config), "n_models": len(records),
                    "chunks": _chunk_table(len(records), chunk_size), "models": [r.to_dict() for r in records]}
        store = cls(root, manifest)
        store.root.mkdir(parents=True, exist_ok=True)
        store._write()
        return store

    @classmethod
    def open(cls, root) -> "ZooStore":
        path = Path(root) / "manifest.json"
        if not path.is_file():
            raise CheckpointError(f"no zoo at {root}: {path} not found")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"zoo manifest {path} is not valid JSON ({e})") from None
        validate_manifest(manifest, str(path))
        return cls(root, manifest)

    @classmethod
    def open_or_create(cls, root, records, chunk_size: int, config) -> "ZooStore":
        """Resume the zoo at `root` if it was made with the same config (a config dataclass or a plain dict) and
        records, else start it."""
        if not (Path(root) / "manifest.json").exists():
            return cls.create(root, records, chunk_size, config)
        store = cls.open(root)
        same = (matches_saved(store.manifest["config"], config)
                and [_plan_fields(m) for m in store.manifest["models"]] == [_plan_fields(r.to_dict()) for r in records]
                and _bounds(store.chunks) == _bounds(_chunk_table(len(records), chunk_size)))
        if not same:
            raise ConfigError(f"{root} already holds a zoo with a different config; use another --out to start a new "
                              "zoo, or the same settings to resume it")
        return store

    def _write(self) -> None:
        if distributed.is_primary():  # the other processes hold the same manifest in memory
            write_json(self.root / "manifest.json", self.manifest)

    # ------------------------------------------------------------------ chunks
    @property
    def chunks(self) -> list[dict]:
        return self.manifest["chunks"]

    @property
    def records(self) -> list[ModelRecord]:
        return [record_from_dict(m, f"model {i}") for i, m in enumerate(self.manifest["models"])]

    def chunk_dir(self, c: int) -> Path:
        return self.root / "chunks" / f"{c:05d}"

    def train_dir(self, c: int) -> Path:
        return self.chunk_dir(c) / "train"

    def complete(self, c: int) -> bool:
        return bool(self.chunks[c]["complete"])

    def save_chunk(self, c: int, variables, records: list[ModelRecord]) -> None:
        """Write chunk c's stacked variables, then its records, then mark it complete (in that order)."""
        chunk = self.chunks[c]
        if [r.index for r in records] != list(range(chunk["start"], chunk["stop"])):
            raise ValueError(f"chunk {c} holds models {chunk['start']}..{chunk['stop'] - 1}, got {[r.index for r in records]}")
        target = self.chunk_dir(c) / "model"
        if distributed.is_primary() and target.exists():  # an attempt killed before the manifest update
            shutil.rmtree(target)
        distributed.barrier(f"zoo chunk {c}: cleared")  # orbax refuses to save into an existing folder
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(target, variables)
        ckpt.wait_until_finished()
        ckpt.close()
        for r in records:
            self.manifest["models"][r.index] = r.to_dict()
        chunk["complete"] = True
        self._write()
        if distributed.is_primary():  # training checkpoints are no longer needed
            shutil.rmtree(self.train_dir(c), ignore_errors=True)
        distributed.barrier(f"zoo chunk {c}: saved")  # on return the chunk is on disk and marked, for every process

    def load_chunk(self, c: int) -> dict:
        """Stacked variables of complete chunk c, as numpy arrays."""
        if not 0 <= c < len(self.chunks):
            raise CheckpointError(f"zoo {self.root} has chunks 0..{len(self.chunks) - 1}, not {c}")
        if not self.complete(c):
            raise CheckpointError(f"zoo chunk {c} ({self.chunk_dir(c)}) is not complete: resume the zoo's training")
        path = self.chunk_dir(c) / "model"
        if not path.is_dir():
            raise CheckpointError(f"zoo chunk {c} is missing: {path} not found")
        try:
            with ocp.StandardCheckpointer() as ckpt:
                tree = ckpt.restore(path)
        except Exception as e:  # orbax raises many types for damaged files; name the chunk instead
            raise CheckpointError(f"zoo chunk {c} ({path}) is damaged or unreadable: {str(e).splitlines()[0][:200]}") from None
        tree = jax.tree.map(np.asarray, tree)
        n = self.chunks[c]["stop"] - self.chunks[c]["start"]
        sizes = {leaf.shape[0] for leaf in jax.tree.leaves(tree)}
        if sizes != {n}:
            raise CheckpointError(f"zoo chunk {c} ({path}) should stack {n} models, found leading sizes {sorted(sizes)}")
        return tree

    def load(self, indices=None) -> tuple[dict, list[ModelRecord]]:
        """(stacked variables, records) of the models `indices` (default: all), in the order asked for (repeats
        allowed); each chunk is read once."""
        records = self.records
        n = len(records)
        idx = np.arange(n) if indices is None else _check_indices(indices, n, self.root)
        starts = np.array([c["start"] for c in self.chunks])
        chunk_of = np.searchsorted(starts, idx, side="right") - 1
        out = None
        for c in np.unique(chunk_of):
            at = np.flatnonzero(chunk_of == c)  # positions in the request served by chunk c
            tree = self.load_chunk(int(c))
            part = jax.tree.map(lambda a, s=idx[at] - self.chunks[c]["start"]: a[s], tree)
            if out is None:
                out = jax.tree.map(lambda a: np.empty((len(idx), *a.shape[1:]), a.dtype), part)
            jax.tree.map(lambda o, p, at=at: o.__setitem__(at, p), out, part)
        return out, [records[i] for i in idx]


def _check_indices(indices, n: int, root) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):  # booleans are not indices
        raise ConfigError(f"zoo {root}: model indices must be a non-empty 1-D list of integers, got {indices!r}")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:  # a negative index would wrap around in the records but select no weights
        raise ConfigError(f"zoo {root} holds models 0..{n - 1}; index {int(bad[0])} is out of range")
    return idx.astype(np.int64)


def _expect_type(value, typ: type, field: str, where: str) -> None:
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):  # JSON true is not a count
        raise CheckpointError(f"{where}: field {field!r} should be {_JSON_NAMES[typ]}, got {value!r} "
                              f"({type(value).__name__})")


_JSON_NAMES = {str: "a string", dict: "an object", int: "an integer", list: "a list", bool: "a boolean (true/false)"}
MANIFEST_TYPES = {"format": str, "config": dict, "n_models": int, "chunks": list, "models": list}
CHUNK_TYPES = {"index": int, "start": int, "stop": int, "complete": bool}


def validate_manifest(m, where: str) -> None:
    """Raise CheckpointError naming what is wrong with a manifest (structure, field types, records, chunk table)."""
    if not isinstance(m, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    for key, typ in MANIFEST_TYPES.items():
        if key not in m:
            raise CheckpointError(f"{where}: missing field {key!r} (expected format, config, n_models, chunks, models)")
        _expect_type(m[key], typ, key, where)
    if m["format"] != FORMAT:
        raise CheckpointError(f"{where}: format {m['format']!r} is not {FORMAT!r}")
    if len(m["models"]) != m["n_models"]:
        raise CheckpointError(f"{where}: n_models is {m['n_models']} but {len(m['models'])} model records are listed")
    for i, d in enumerate(m["models"]):
        try:
            r = record_from_dict(d, f"{where}: model {i}")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        if r.index != i:
            raise CheckpointError(f"{where}: model record {i} has index {r.index}")
    expect = 0
    for c, chunk in enumerate(m["chunks"]):
        _expect_type(chunk, dict, f"chunks[{c}]", where)
        if set(chunk) != set(CHUNK_TYPES):
            raise CheckpointError(f"{where}: chunk {c} should have index, start, stop, complete")
        for key, typ in CHUNK_TYPES.items():
            _expect_type(chunk[key], typ, f"chunks[{c}].{key}", where)
        if chunk["index"] != c or chunk["start"] != expect or not chunk["start"] < chunk["stop"] <= m["n_models"]:
            raise CheckpointError(f"{where}: chunk {c} covers {chunk['start']}..{chunk['stop']}, expected to start at "
                                  f"{expect} and end within {m['n_models']} models")
        expect = chunk["stop"]
    if expect != m["n_models"]:
        raise CheckpointError(f"{where}: chunks cover {expect} of {m['n_models']} models")
