"""Mitigation by unlearning (Neural Cleanse, Sec. VI-C): fine-tune with the training core on clean images, some
stamped with a flagged label's reversed trigger but keeping their true labels."""
from __future__ import annotations

import jax
import numpy as np
import optax

from bdjax.defenses.neural_cleanse.detect import NCResult
from bdjax.errors import ConfigError
from bdjax.train import core
from bdjax.train.loop import train_loop


def unlearn(model, variables, x_clean, y_clean, result: NCResult, *, labels=None, fraction: float = 0.2,
            epochs: int = 2, lr: float = 0.01, momentum: float = 0.9, batch_size: int = 64,
            seed: int = 0) -> tuple[dict, dict]:
    """Fine-tune on clean images, `fraction` of them stamped with the reversed trigger of a flagged label
    (round-robin over `labels`, default result.flagged_labels) while keeping their TRUE labels, so the
    model unlearns the trigger -> target shortcut (Neural Cleanse, Sec. VI-C). SGD with momentum, train mode
    (BatchNorm statistics are updated), one device; the batch order is the core's (seed, step) order. Returns (new variables as host numpy arrays, info)."""
    labels = list(result.flagged_labels if labels is None else labels)
    x = np.asarray(x_clean)
    y = np.asarray(y_clean, np.int32)
    if not 0 < fraction <= 1:
        raise ConfigError(f"unlearning fraction must be in (0, 1], got {fraction!r}")
    if len(x) < batch_size:
        raise ConfigError(f"unlearning batch_size={batch_size} is larger than the {len(x)} clean images")
    info = {"unlearn_labels": [int(l) for l in labels], "unlearn_fraction": float(fraction), "unlearn_epochs": int(epochs)}
    if not labels:
        return variables, {**info, "unlearn_steps": 0}
    rng = np.random.default_rng(seed)
    xf = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    chosen = rng.choice(len(x), max(1, int(round(fraction * len(x)))), replace=False)
    for j, i in enumerate(chosen):
        mask, pattern = result.trigger(labels[j % len(labels)])
        xf[i] = (1 - mask) * xf[i] + mask * pattern

    dev = jax.devices()[0]
    # Fresh device buffers: the step donates its state, and device_put alone would hand back the caller's arrays.
    variables = jax.device_put(jax.device_get(variables), dev)
    tx = optax.sgd(lr, momentum=momentum)
    state = core.TrainState.create(variables, tx)
    steps_per_epoch = len(x) // batch_size
    step = core.compile_step(core.training_step(model, tx, core.gather_arrays, batch_size=batch_size,
                                                steps_per_epoch=steps_per_epoch))
    data, task = jax.device_put(((xf, y), core.RunTask(np.int32(seed))), dev)
    perm_key = core.stream_keys(seed)["perm"]
    order = lambda epoch: core.epoch_permutation(perm_key, epoch, len(x))
    state, n_steps = train_loop(lambda st, perm: step(st, task, perm, data), state, order,
                                steps_per_epoch=steps_per_epoch, epochs=epochs, show_progress=False)
    # host arrays: usable by any later jit, whatever its device placement (e.g. bdjax.train.evaluate's mesh)
    return jax.device_get(state.variables), {**info, "unlearn_steps": n_steps, "unlearn_n_stamped": int(len(chosen))}
