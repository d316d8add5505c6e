"""Periodic, atomic checkpoints with orbax (never pickle: a checkpoint may come from someone untrusted).

orbax writes each step into a temporary folder and renames it when complete, so a run killed mid-save keeps
its previous checkpoint; restoring goes into an abstract tree of the expected shapes, dtypes and shardings.
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from bdjax.errors import CheckpointError


class Checkpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state) -> None:
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, template, step: int | None = None):
        """Restore into the structure, shapes, dtypes and shardings of `template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} does not match the model being trained "
                                  f"or is damaged: {str(e).splitlines()[0]}") from None

    def close(self) -> None:
        self._manager.close()
