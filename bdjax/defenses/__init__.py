"""Backdoor defenses: data filters (Spectral Signatures, Activation Clustering, STRIP) and model inspectors
(Neural Cleanse). Each runs compiled and batched; metrics share one vocabulary (bdjax.defenses.metrics).

The functions `neural_cleanse` and `activation_clustering` are not re-exported here: their names are the
submodules' (`from bdjax.defenses import neural_cleanse` is the module); use the `*_defense` entry points or the
submodules."""
from bdjax.defenses.activation_clustering import ACResult, activation_clustering_defense
from bdjax.defenses.features import available_layers, extract_features
from bdjax.defenses.metrics import filter_metrics, flag_small_outliers, mad_anomaly_index, roc_auc, roc_points
from bdjax.defenses.neural_cleanse import NCConfig, NCResult, save_trigger_grid, unlearn
from bdjax.defenses.spectral import SpectralResult, retrain, spectral_defense, spectral_filter, spectral_scores
from bdjax.defenses.strip import StripResult, run_strip, strip_entropy, strip_threshold

__all__ = [
    "ACResult", "NCConfig", "NCResult", "SpectralResult", "StripResult", "activation_clustering_defense",
    "available_layers", "extract_features", "filter_metrics", "flag_small_outliers", "mad_anomaly_index", "retrain",
    "roc_auc", "roc_points", "run_strip", "save_trigger_grid", "spectral_defense", "spectral_filter",
    "spectral_scores", "strip_entropy", "strip_threshold", "unlearn",
]
