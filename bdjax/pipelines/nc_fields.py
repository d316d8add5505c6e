"""One-line docs of Neural Cleanse's settings without a comment in their class, for `bdjax fields` (imported by
the pipelines that expose NCConfig as a config section)."""
from bdjax.config import document
from bdjax.defenses.neural_cleanse import NCConfig

document(NCConfig, lr="Adam learning rate of the masks and patterns", beta1="Adam beta1", beta2="Adam beta2",
         init_cost="the mask-norm cost once the attack first succeeds (official 1e-3)",
         success_threshold="attack success rate a check-point must reach to count (official 0.99)",
         patience="check-points before the cost goes up or down (official 5)",
         early_stop="stop a label once its best norm stops improving",
         anomaly_threshold="MAD anomaly index above which a label (or a model) is flagged (official 2)",
         seed="initial triggers and batch order")
