"""Neural Cleanse (Wang et al., IEEE S&P 2019; official code bolunwang/backdoor): reverse-engineer, for every
label, the smallest trigger that sends clean images to that label; a backdoored label needs a much smaller
trigger than the others, which shows up as a low outlier of the mask norms (MAD anomaly index > 2).

    res = neural_cleanse(model, variables, x_clean, num_classes)          # all labels at once
    res.norms, res.anomaly_index, res.flagged_labels, res.masks, res.patterns
    save_trigger_grid(out / "nc_triggers.png", res)
    new_vars, info = unlearn(model, variables, x_clean, y_clean, res)     # optional mitigation

Per label l the trigger is a one-channel mask m = tanh(a)/2 + 0.5 (H, W, 1) and a pattern
p = tanh(b)/2 + 0.5 (H, W, C); the stamped image is (1 - m) * x + m * p (inputs in [0, 1]) and the loss
mean CE(f(stamped), l) + cost * |m|_1, minimised with Adam (lr 0.1, betas (0.5, 0.9)) on batches of clean images.
The official code divides tanh by (2 - 1e-7) (so masks can leave [0, 1] by 1e-7); here tanh/2 + 0.5 is used
and the random initial mask/pattern (uniform in [0, 1], as the official script) are clipped before arctanh.

Cost schedule (the official `Visualizer.visualize`, patience 5, multiplier 2 up, 2**1.5 down), per label:
- the cost starts at 0 (RESET_COST_TO_ZERO) and is set to init_cost (1e-3) after `patience` consecutive
  check-points with attack success >= 99% (counters and up/down flags are reset then);
- after `patience` consecutive check-points at >= 99% the cost is multiplied by 2, after `patience` below it
  is divided by 2**1.5;
- a check-point that reaches 99% with a smaller mean mask norm than the best so far saves the current
  mask and pattern (the smallest-norm mask that reaches 99% is kept; if none ever does, the last one is);
- early stop once the cost has gone both up and down and the best norm has not improved for
  `early_stop_patience` = 25 check-points.

Granularity: as in the original, the schedule is updated per CHECK-POINT, i.e. per mini-epoch of
`steps_per_check` Adam steps (official: NB_SAMPLE 1000 // BATCH_SIZE 32 = 31), with the attack success and
mask norm averaged over the batches of that mini-epoch; at most `max_checks` check-points (official: 1000).

Vectorisation: every label's parameters, Adam state and schedule counters are arrays with a leading label
axis. A step stamps the shared clean batch with every label's trigger and sends the L x B stamped images
through the (shared) model as ONE batch of L * B images; the loss is the sum of the per-label losses, so
each label gets the gradient of its own loss. The update is one pure function (an Adam step, then the schedule update at each check-point end, on device). On
CPU the host drives it, one jitted call per step, dispatched asynchronously; the host waits only
every `checks_per_sync` check-points, to stop once every label has early-stopped. (A lax.fori_loop over
the steps, `NCConfig.driver="loop"`, the default off CPU, saves the dispatches but is slower here: XLA:CPU runs
the input-gradient convolutions of a loop body 4-10x slower than at top level.) A label that has early-stopped is frozen (its parameters, Adam state and
counters no longer change) while the others continue, so running labels together or one at a time
(`mode="sequential"`: the same code with one label) gives the same result up to float32 rounding. All
labels share the same clean batch at each step; the batch of step t is a function of (seed, t) and the
initial trigger of label l of (seed, l). With several devices (bdjax exposes every CPU core as one) the
label axis is sharded over them (no cross-device communication in a step), so each core optimises its
share of the labels; one label runs on one device.

Speed (scripts/bench_neural_cleanse.py): the gain of all labels at once over one at a time is at most the
device count (2 here) times how much cheaper an image gets in a batch L times bigger, which on XLA:CPU is
little for a convolutional net (~1.2x for 8x8 digits, none for 32x32 GTSRB images): measured 0.8-1.2x on 2
shared CPU cores, see the script's docstring. GTSRB, 43 labels x 16 images, cifar_cnn: ~2 CPU-seconds per step.

Modules: config (NCConfig), schedule (the cost schedule as array state), optimize (the pure (init, update) pair
and its drivers), detect (NCResult, anomaly index, model_score), unlearn (mitigation); the figure is in bdjax.plots.
"""
from bdjax.defenses.neural_cleanse.config import MODES, NCConfig
from bdjax.defenses.neural_cleanse.detect import NCResult, model_score, neural_cleanse
from bdjax.defenses.neural_cleanse.optimize import (NCOptimizer, NCState, decode, nc_optimizer, reverse_engineer,
                                                    stamp)
from bdjax.defenses.neural_cleanse.schedule import CostSchedule, schedule_init, schedule_update
from bdjax.defenses.neural_cleanse.unlearn import unlearn
from bdjax.plots import save_trigger_grid

__all__ = ["MODES", "CostSchedule", "NCConfig", "NCOptimizer", "NCResult", "NCState", "decode", "model_score",
           "nc_optimizer", "neural_cleanse", "reverse_engineer", "save_trigger_grid", "schedule_init",
           "schedule_update", "stamp", "unlearn"]
