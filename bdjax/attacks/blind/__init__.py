"""Blind backdoors (Bagdasaryan and Shmatikov, USENIX Security 2021): the attack is a loss computation.

- mgda: Gram matrix of task gradients, normalisations, the min-norm weights (2-task closed form, simplex solver);
- synthesizers / labels: the input function mu and the label function v (calculator: the two-digit MNIST task);
- step: make_blind -> a core grad_fn (MGDA or fixed scales, threshold T, Neural Cleanse evasion, gradient shaping)
  and the TrainState.extra it carries, for bdjax.train.fit(grad_fn=..., extra=...);
- evaluate: backdoor test sets and accuracies.
"""
from bdjax.attacks.blind.calculator import calculator_dataset
from bdjax.attacks.blind.config import BALANCING, EVASIONS, BlindConfig
from bdjax.attacks.blind.evaluate import backdoor_test_set, blind_accuracies
from bdjax.attacks.blind.labels import LABELS, LabelFunction, calculator, check_label_function, constant, make_label_function
from bdjax.attacks.blind.mgda import (NORMALIZATIONS, brute_force_min_norm, check_normalization, gram, mgda_weights,
                                      min_norm_2, min_norm_simplex, task_scales)
from bdjax.attacks.blind.step import BlindAttack, attack_on, backdoor_batch, make_blind, running_mean
from bdjax.attacks.blind.synthesizers import (SYNTHESIZERS, Synthesizer, make_synthesizer, physical, pixel_pattern,
                                              single_pixel, synthesize_uint8)

__all__ = ["BALANCING", "EVASIONS", "LABELS", "NORMALIZATIONS", "SYNTHESIZERS", "BlindAttack", "BlindConfig",
           "LabelFunction", "Synthesizer", "attack_on", "backdoor_batch", "backdoor_test_set", "blind_accuracies", "brute_force_min_norm",
           "calculator", "calculator_dataset", "check_label_function", "check_normalization", "constant", "gram",
           "make_blind", "make_label_function", "make_synthesizer", "mgda_weights", "min_norm_2", "min_norm_simplex",
           "physical", "pixel_pattern", "running_mean", "single_pixel", "synthesize_uint8", "task_scales"]
