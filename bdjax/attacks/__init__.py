"""Backdoor attacks."""
from bdjax.attacks.badnets import PoisonedSet, make_trigger, poison_test_set, poison_training_set
from bdjax.attacks.labels import LABEL_MAPS, LabelMap

__all__ = ["LABEL_MAPS", "LabelMap", "PoisonedSet", "make_trigger", "poison_test_set", "poison_training_set"]
