"""Training: optimisers, augmentation, the jitted step, evaluation and the resumable loop."""
from bdjax.train.evaluate import accuracy, evaluate, per_class_accuracy, predict
from bdjax.train.loop import fit
from bdjax.train.optim import make_optimizer, make_schedule
from bdjax.train.state import TrainState, create_state
from bdjax.train.step import make_train_step

__all__ = ["TrainState", "accuracy", "create_state", "evaluate", "fit", "make_optimizer", "make_schedule",
           "make_train_step", "per_class_accuracy", "predict"]
