"""Backdoors in self-supervised pretraining (Saha et al. 2022): MoCo v2, BYOL, RotNet and Jigsaw on the training core,
on-device two-view augmentation, target-category poisoning and linear evaluation.

    model, state = pretrain("moco", backbone, train_cfg, x_unlabelled, seed=0, method_cfg=MocoConfig(...))
    feats = extract_features(model, state.variables, x)      # frozen backbone, "penultimate"
"""
from bdjax.ssl.augment import AugmentConfig, ssl_augment, two_views
from bdjax.ssl.byol import ByolConfig
from bdjax.ssl.jigsaw import JigsawConfig
from bdjax.ssl.linear_eval import (LinearEvalConfig, backdoor_metrics, evaluate_linear, extract_features, knn_monitor,
                                   knn_predict, labelled_subset, normalise_features, predict_linear, train_linear)
from bdjax.ssl.moco import MocoConfig
from bdjax.ssl.poison import PoisonConfig, load_trigger, paste_random, poison_target_category
from bdjax.ssl.pretraining import METHODS, build, pretrain
from bdjax.ssl.rotnet import RotNetConfig

__all__ = ["METHODS", "AugmentConfig", "ByolConfig", "JigsawConfig", "LinearEvalConfig", "MocoConfig", "PoisonConfig",
           "RotNetConfig", "backdoor_metrics", "build", "evaluate_linear", "extract_features", "knn_monitor",
           "knn_predict", "labelled_subset", "load_trigger", "normalise_features", "paste_random",
           "poison_target_category", "predict_linear", "pretrain", "train_linear", "two_views", "ssl_augment"]
