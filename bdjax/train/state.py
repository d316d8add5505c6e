"""The training state: a plain pytree (no functions inside), so orbax saves and restores it as it is."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    opt_state: Any

    @property
    def variables(self) -> dict:
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def create_state(model, tx: optax.GradientTransformation, key: jax.Array, image_shape) -> TrainState:
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *image_shape), jnp.float32), train=False))(key)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
