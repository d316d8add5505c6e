"""Hidden Trigger Backdoor Attacks (Saha et al., AAAI 2020): crafting the poisons.

    from bdjax.attacks import htba
    variables = htba.load_alexnet("alexnet.safetensors")                 # torchvision names and layout
    targets, sources = htba.pair_images(x, y, source_class=s, target_class=t, seed=0)
    result = htba.craft_poisons(get_model("alexnet", 1000), variables, targets, sources,
                                triggers.from_image("trigger_10.png", size=30), htba.HTBAConfig(), key=0)
    htba.save_poisons("run/poisons", result.poisons)                     # 8-bit PNGs, rounded
    htba.save_poison_grid("run/poisons.png", result.targets, result.poisons, eps=16 / 255)
    poisons_u8 = htba.load_poisons("run/poisons")                        # what finetuning should read

Modules: config (HTBAConfig), assignment (Hungarian / greedy matching), crafter (the (init, update) pair),
craft (the compiled loop over batches and devices), features (the feature layer), loop_convs (an XLA:CPU
workaround), weights (AlexNet files), poison_files (PNGs and the grid), data (source/target images).
"""
from bdjax.attacks.htba.assignment import assignment_cost, greedy, hungarian, match, squared_distances
from bdjax.attacks.htba.config import HTBAConfig
from bdjax.attacks.htba.craft import HTBAResult, batch_mesh, craft_poisons, make_crafter
from bdjax.attacks.htba.crafter import CraftInputs, HTBAState, PoisonCrafter, poison_crafter
from bdjax.attacks.htba.data import pair_images
from bdjax.attacks.htba.features import check_feature_layer, feature_fn
from bdjax.attacks.htba.poison_files import load_poisons, save_poison_grid, save_poisons, to_uint8
from bdjax.attacks.htba.weights import load_alexnet, save_alexnet, torch_shapes

__all__ = [
    "CraftInputs", "HTBAConfig", "HTBAResult", "HTBAState", "PoisonCrafter", "assignment_cost", "batch_mesh",
    "check_feature_layer", "craft_poisons", "feature_fn", "greedy", "hungarian", "load_alexnet", "load_poisons",
    "make_crafter", "match", "pair_images", "poison_crafter", "save_alexnet", "save_poison_grid", "save_poisons",
    "squared_distances", "to_uint8", "torch_shapes",
]
