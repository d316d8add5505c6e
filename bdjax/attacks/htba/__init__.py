"""Hidden Trigger Backdoor Attacks (Saha et al., AAAI 2020): crafting the poisons.

    from bdjax.attacks import htba
    variables = htba.load_alexnet("alexnet.safetensors")                 # torchvision names and layout
    targets, sources = htba.pair_images(x, y, source_class=s, target_class=t, seed=0)
    result = htba.craft_poisons(get_model("alexnet", 1000), variables, targets, sources,
                                triggers.from_image("trigger_10.png", size=30), htba.HTBAConfig(), key=0)
    htba.save_poisons("run/poisons", result.poisons)                     # 8-bit PNGs, rounded
    htba.save_poison_grid("run/poisons.png", result.targets, result.poisons, eps=16 / 255)
    poisons_u8 = htba.load_poisons("run/poisons")                        # what finetuning should read

Victim side (victim.py, pretrain.py): pretrain_features (a feature net on classes disjoint from the pair),
with_new_head, finetune_set (clean + poisons with their target labels), finetune (fit with train.trainable),
evaluate_attack (val_clean, val_patched_source, asr).

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
from bdjax.attacks.htba.victim import (class_index, evaluate_attack, finetune, finetune_set, patch_images,
                                         select_classes, with_new_head)
from bdjax.attacks.htba.pretrain import other_classes, pretrain_features
from bdjax.attacks.htba.poison_files import load_poisons, save_poison_grid, save_poisons, to_uint8
from bdjax.attacks.htba.weights import load_alexnet, save_alexnet, torch_shapes

__all__ = [
    "CraftInputs", "HTBAConfig", "HTBAResult", "HTBAState", "PoisonCrafter", "assignment_cost", "batch_mesh",
    "check_feature_layer", "class_index", "craft_poisons", "evaluate_attack", "feature_fn", "finetune",
    "finetune_set", "greedy", "hungarian", "load_alexnet", "load_poisons", "make_crafter", "match", "other_classes",
    "pair_images", "patch_images", "poison_crafter", "pretrain_features", "save_alexnet", "save_poison_grid",
    "save_poisons", "select_classes", "squared_distances", "to_uint8", "torch_shapes", "with_new_head",
]
