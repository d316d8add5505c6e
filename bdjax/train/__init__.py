"""Training: one core step built from a loss function (bdjax.train.core), run for one model, for a population
of models (bdjax.train.population) or under the data mesh, and driven by one resumable host loop (bdjax.train.loop)."""
from bdjax.train.core import (TrainState, classification_loss, compile_step, create_state, data_step, init_state,
                              make_update, stream_keys, to_float, value_and_grad)
from bdjax.train.evaluate import accuracy, evaluate, per_class_accuracy, predict
from bdjax.train.loop import fit, train_loop
from bdjax.train.optim import make_optimizer, make_schedule

__all__ = ["TrainState", "accuracy", "classification_loss", "compile_step", "create_state", "data_step", "evaluate",
           "fit", "init_state", "make_optimizer", "make_schedule", "make_update", "per_class_accuracy", "predict",
           "stream_keys", "to_float", "train_loop", "value_and_grad"]
