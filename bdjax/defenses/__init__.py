"""Backdoor defenses: data filters (Spectral Signatures, Activation Clustering, STRIP) and model inspectors
(Neural Cleanse). Each runs compiled and batched; metrics share one vocabulary (bdjax.defenses.metrics)."""
