"""The victim's half of HTBA: finetune a pretrained feature network on clean images plus the poisons (labelled with
their true class, the target), then measure Val Clean, Val Patched (source only) and the attack success rate.

    variables = htba.with_new_head(pretrained, model.init(...), head="fc8")   # a fresh classifier for the task
    x, y = htba.finetune_set(x_clean, y_clean, htba.load_poisons("run/poisons"), classes, target)
    state = htba.finetune(model, variables, TrainConfig(trainable=("fc8",), ...), x, y, seed=0)
    metrics = htba.evaluate_attack(model, state.variables, x_val, y_val, classes=classes, sources=(s,), target=t,
                                   trigger=trigger)

`classes` are the dataset labels the finetuned classifier tells apart (the pair (source, target) in the paper's
binary CIFAR-10 setting, or every class for the multi-source attack); its output i means classes[i].
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from bdjax import triggers as T
from bdjax.errors import ConfigError, DataError


def class_index(labels, classes: Sequence[int]) -> np.ndarray:
    """Dataset labels -> positions in `classes` (the finetuned classifier's outputs); DataError for any other label."""
    classes = np.asarray(classes)
    labels = np.asarray(labels)
    lookup = {int(c): i for i, c in enumerate(classes.tolist())}
    if len(lookup) != len(classes):
        raise ConfigError(f"htba classes must be distinct, got {classes.tolist()}")
    bad = sorted(set(labels.tolist()) - set(lookup))
    if bad:
        raise DataError(f"htba labels {bad} are not among the finetuned classes {classes.tolist()}")
    return np.asarray([lookup[int(v)] for v in labels.tolist()], np.int32)


def select_classes(x, y, classes: Sequence[int], per_class: int | None = None, seed: int = 0):
    """The images of `classes` (at most per_class of each, a seeded random choice), labels kept as in the dataset."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    idx = []
    for c in classes:
        found = np.flatnonzero(y == c)
        if found.size == 0:
            raise DataError(f"htba class {c} has no images")
        if per_class is not None:
            if found.size < per_class:
                raise DataError(f"htba needs {per_class} images of class {c}, the data has {found.size}")
            found = np.sort(rng.choice(found, per_class, replace=False))
        idx.append(found)
    idx = np.concatenate(idx)
    return x[idx], y[idx]


def finetune_set(x_clean, y_clean, poisons, classes: Sequence[int], target: int):
    """Clean images (dataset labels among `classes`) plus uint8 poisons labelled `target`, with labels turned into
    positions in `classes`. The poisons are clean-label: target is their true class."""
    poisons = np.asarray(poisons)
    if poisons.dtype != np.uint8 or poisons.ndim != 4:
        raise DataError(f"htba poisons must be (N, H, W, C) uint8 images (load_poisons), got {poisons.dtype} "
                        f"{poisons.shape}")
    x_clean = np.asarray(x_clean)
    if tuple(poisons.shape[1:]) != tuple(x_clean.shape[1:]):
        raise DataError(f"htba poisons are {poisons.shape[1:]} images but the clean ones are {x_clean.shape[1:]}")
    if int(target) not in [int(c) for c in classes]:
        raise ConfigError(f"htba target {target} is not among the finetuned classes {list(classes)}")
    x = np.concatenate([x_clean.astype(np.uint8), poisons])
    y = np.concatenate([np.asarray(y_clean), np.full(len(poisons), int(target))])
    return x, class_index(y, classes)


def with_new_head(pretrained: dict, fresh: dict, heads: Sequence[str] = ("fc8",)) -> dict:
    """`fresh`'s parameters for the `heads` layers (a new classifier, e.g. 2 outputs), `pretrained`'s for every
    other layer. Every other layer must exist in both with the same shapes (one line otherwise)."""
    p, f = pretrained["params"], fresh["params"]
    missing = sorted(set(heads) - set(f))
    if missing:
        raise ConfigError(f"htba head layers {missing} are not in the model; its layers are {', '.join(sorted(f))}")
    out = {}
    for name in f:
        if name in heads:
            out[name] = f[name]
            continue
        if name not in p:
            raise ConfigError(f"htba pretrained weights have no layer {name!r} (they have {', '.join(sorted(p))})")
        got = jax.tree.map(np.shape, p[name])
        want = jax.tree.map(np.shape, f[name])
        if got != want:
            raise ConfigError(f"htba pretrained layer {name!r} has shapes {got}, the model expects {want}")
        out[name] = p[name]
    result = {"params": out}
    if pretrained.get("batch_stats"):
        result["batch_stats"] = pretrained["batch_stats"]
    return result


def frozen_features_loss(model):
    """Cross-entropy with the network in eval mode: dropout off and BatchNorm statistics frozen, so the frozen
    layers compute exactly the features the poisons were crafted against (train mode would move BN's running
    statistics, which train.trainable does not cover: they are not parameters)."""
    import optax

    def loss_fn(params, state, batch, rng):
        variables = {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
        logits = model.apply(variables, batch["x"], train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        acc = jax.numpy.mean(jax.numpy.argmax(logits, -1) == batch["y"])
        return loss, {"metrics": {"loss": loss, "acc": acc}}
    return loss_fn


def finetune(model, variables: dict, cfg, x, y, *, seed: int, run=None, desc: str = "finetune"):
    """`bdjax.train.fit` started from `variables`, in eval mode (frozen_features_loss); cfg.trainable names the
    layers that move (the paper: fc8). Resumes from `run`'s checkpoint when there is one. Returns the TrainState."""
    from bdjax.train.loop import fit

    if not cfg.trainable:
        raise ConfigError("htba finetuning needs train.trainable (e.g. fc8): the feature layers must stay frozen")
    if cfg.augment == "none" and len(cfg.trainable) == 1:
        state = _finetune_head_on_cached_features(model, variables, cfg, x, y, seed=seed, run=run, desc=desc)
        if state is not None:
            return state
    return fit(model, cfg, x, y, seed=seed, run=run, init_variables=variables, desc=desc,
               loss_fn=frozen_features_loss(model))


class DenseHead(nn.Module):
    """The last layer of a bdjax model alone (logits = Dense(penultimate)), under the model's own layer name."""
    num_classes: int
    layer: str

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes, name=self.layer)(x)


def _finetune_head_on_cached_features(model, variables: dict, cfg, x, y, *, seed: int, run, desc: str):
    """Only the head moves and nothing augments the images, so the frozen layers give the same eval-mode features
    at every step: compute them once and train the head on them. The same batches, initial head and updates as
    the whole network (the paper's fc8 finetuning), about 10x faster on CPU. None (the caller trains the whole
    network) when the model's logits are not the head applied to its penultimate features."""
    from bdjax.defenses.features import extract_features
    from bdjax.train.loop import fit

    (head,) = cfg.trainable
    params = variables["params"]
    x = np.asarray(x)
    if x.dtype != np.uint8 or set(params.get(head, {})) != {"kernel", "bias"} or np.ndim(params[head]["kernel"]) != 2:
        return None  # float images, or not a Dense layer
    feats = extract_features(model, variables, x, "penultimate")
    # the model's function either is Dense(penultimate) or is not: a few images tell
    probe = x[:256]
    logits = extract_features(model, variables, probe, "logits")
    if np.shape(params[head]["kernel"]) != (feats.shape[-1], logits.shape[-1]):
        return None
    head_model = DenseHead(logits.shape[-1], head)
    head_vars = {"params": {head: params[head]}}
    if not np.allclose(np.asarray(head_model.apply(head_vars, feats[:len(probe)])), logits, rtol=1e-4, atol=1e-4):
        return None
    state = fit(head_model, cfg, feats, y, seed=seed, run=run, init_variables=head_vars, desc=desc,
                loss_fn=frozen_features_loss(head_model))
    # the whole network's weights with the trained head (opt_state stays the head's: finetuning has ended)
    return state.replace(params={**params, head: state.params[head]}, batch_stats=variables.get("batch_stats", {}))


def patch_images(x, trigger: T.Trigger, seed: int = 0) -> np.ndarray:
    """The trigger pasted at a random place on every image (uint8 in, uint8 out), as at attack time."""
    x = np.asarray(x)
    if len(x) == 0:
        return x
    T.check_fits(trigger, x.shape[1:])
    return np.asarray(T.apply_random(jax.random.key(seed), x, trigger))


def evaluate_attack(model, variables, x_val, y_val, *, classes: Sequence[int], sources: Sequence[int], target: int,
                    trigger: T.Trigger, seed: int = 0, batch_size: int = 1000) -> dict:
    """val_clean: accuracy on the clean validation images of `classes`; val_patched_source: accuracy (true label =
    their source class) on the validation images of `sources` with the trigger pasted at a random place (lower =
    stronger attack); asr: the fraction of those patched images classified as `target`."""
    from bdjax.train.evaluate import predict

    classes = [int(c) for c in classes]
    sources = [int(s) for s in sources]
    if int(target) in sources or not set(sources) <= set(classes) or int(target) not in classes:
        raise ConfigError(f"htba sources {sources} and target {target} must be distinct classes among {classes}")
    y_val = np.asarray(y_val)
    xc, yc = select_classes(x_val, y_val, classes)
    pred = predict(model, variables, xc, batch_size)
    val_clean = float(np.mean(pred == class_index(yc, classes)))
    xs, ys = select_classes(x_val, y_val, sources)
    pred_p = predict(model, variables, patch_images(xs, trigger, seed), batch_size)
    t = classes.index(int(target))
    return {"val_clean": val_clean, "val_patched_source": float(np.mean(pred_p == class_index(ys, classes))),
            "asr": float(np.mean(pred_p == t)), "n_val_clean": int(len(yc)), "n_val_patched": int(len(ys))}
