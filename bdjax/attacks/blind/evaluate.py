"""Backdoor accuracy: how often a model gives the backdoor label v(y) to synthesised test inputs mu(x)."""
from __future__ import annotations

import numpy as np

from bdjax.attacks.blind.labels import LabelFunction
from bdjax.attacks.blind.synthesizers import Synthesizer, synthesize_uint8
from bdjax.train.evaluate import accuracy, predict


def backdoor_test_set(x_test: np.ndarray, y_test: np.ndarray, synth: Synthesizer, label_fn: LabelFunction,
                      seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(mu(x), v(y)) for the test images whose backdoor label differs from their true label (as ASR excludes the
    target class: a model that is merely right there is not backdoored); random synthesizers use `seed`."""
    y_bd = np.asarray(label_fn.apply(np.asarray(y_test, np.int32)), np.int32)
    keep = y_bd != y_test
    return synthesize_uint8(synth, x_test[keep], seed), y_bd[keep]


def blind_accuracies(model, variables, x_test, y_test, x_bd, y_bd, batch_size: int = 1000) -> dict:
    return {"main_acc": accuracy(predict(model, variables, x_test, batch_size), y_test),
            "backdoor_acc": accuracy(predict(model, variables, x_bd, batch_size), y_bd)}
