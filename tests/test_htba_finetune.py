"""HTBA victim side: finetuning moves only the head, the metrics read the right images, the data splits and the
label mapping, and the one-line errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import triggers as T
from bdjax.attacks import htba
from bdjax.config import TrainConfig
from bdjax.errors import ConfigError, DataError
from bdjax.models import get_model, init_model
from bdjax.pipelines.htba import random_pairs, split_pair_data

def test_finetune_with_trainable_head_keeps_every_other_layer_and_the_bn_statistics_bit_identical():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype(np.int32)
    model = get_model("cifar_cnn", 2, widths=(4, 4, 4))
    fresh = jax.device_get(init_model(model, jax.random.key(2), (8, 8, 3)))
    # "pretrained" weights: other values, a 3-way head, BN statistics away from their init
    pretrained = jax.tree.map(lambda a: np.asarray(a) + 0.25, fresh)
    pretrained["params"]["fc"] = {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}
    start = htba.with_new_head(pretrained, fresh, heads=("fc",))
    assert np.shape(start["params"]["fc"]["kernel"]) == (4, 2)
    np.testing.assert_array_equal(start["params"]["conv6"]["kernel"], pretrained["params"]["conv6"]["kernel"])
    # weight decay on: it must not leak into the frozen layers either
    cfg = TrainConfig(model="cifar_cnn", epochs=2, batch_size=16, lr=0.5, weight_decay=0.1, trainable=("fc",))
    state = htba.finetune(model, start, cfg, x, y, seed=0)
    after = jax.device_get(state.variables)
    for name in start["params"]:
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), start["params"][name], after["params"][name])
        assert all(jax.tree.leaves(same)) == (name != "fc"), name
    # train-mode BN would have moved the running statistics: the features would no longer be the crafted-on ones
    jax.tree.map(np.testing.assert_array_equal, start["batch_stats"], after["batch_stats"])
    with pytest.raises(ConfigError, match="needs train.trainable"):
        htba.finetune(model, start, TrainConfig(model="cifar_cnn", epochs=1, batch_size=16), x, y, seed=0)


def test_head_finetuning_on_cached_features_matches_training_the_whole_network_with_the_rest_frozen():
    from bdjax.train.loop import fit

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (96, 8, 8, 3), dtype=np.uint8)
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype(np.int32)
    model = get_model("cifar_cnn", 2, widths=(4, 4, 8))
    start = jax.device_get(init_model(model, jax.random.key(3), (8, 8, 3)))
    cfg = TrainConfig(model="cifar_cnn", epochs=3, batch_size=16, lr=0.5, momentum=0.9, trainable=("fc",))
    fast_state = htba.victim._finetune_head_on_cached_features(model, start, cfg, x, y, seed=4, run=None, desc="t")
    assert fast_state is not None  # cifar_cnn's logits are fc(penultimate): the cached path applies
    fast = jax.device_get(fast_state.variables)
    jax.tree.map(np.testing.assert_array_equal, fast,
                 jax.device_get(htba.finetune(model, start, cfg, x, y, seed=4).variables))  # finetune takes it
    slow = jax.device_get(fit(model, cfg, x, y, seed=4, init_variables=start,
                              loss_fn=htba.victim.frozen_features_loss(model)).variables)
    moved = np.abs(fast["params"]["fc"]["kernel"] - start["params"]["fc"]["kernel"]).max()
    assert moved > 0.01  # it trained
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), fast, slow)
    # a layer that is not the head: the whole network is trained, and only that layer moves
    conv = TrainConfig(model="cifar_cnn", epochs=1, batch_size=16, lr=0.5, trainable=("conv6",))
    assert htba.victim._finetune_head_on_cached_features(model, start, conv, x, y, seed=4, run=None, desc="t") is None
    after = jax.device_get(htba.finetune(model, start, conv, x, y, seed=4).variables)["params"]
    assert not np.array_equal(after["conv6"]["kernel"], start["params"]["conv6"]["kernel"])
    np.testing.assert_array_equal(after["fc"]["kernel"], start["params"]["fc"]["kernel"])


class BrightIsTarget(nn.Module):
    """Output `target_index` for an image with any pixel above 0.8 or a mean above 0.4, else the other class."""
    target_index: int

    @nn.compact
    def __call__(self, x, train=False):
        bright = (x.max(axis=(1, 2, 3)) > 0.8) | (x.mean(axis=(1, 2, 3)) > 0.4)
        hot = jnp.where(bright, self.target_index, 1 - self.target_index)
        return jax.nn.one_hot(hot, 2)


def test_evaluate_attack_reads_clean_pair_images_and_patched_source_images():
    # val set: 5 source (class 3, black), 4 target (class 1, gray), 6 of another class (7, white: would count as
    # target-like, so including them in val_clean would lower it)
    x = np.concatenate([np.zeros((5, 12, 12, 3)), np.full((4, 12, 12, 3), 128), np.full((6, 12, 12, 3), 255)])
    y = np.array([3] * 5 + [1] * 4 + [7] * 6)
    trigger = T.patch(2, 3, color=1.0)
    classes = [1, 3]  # outputs: 0 = class 1 (the target), 1 = class 3 (the source)
    m = htba.evaluate_attack(BrightIsTarget(0), {}, x.astype(np.uint8), y, classes=classes, sources=[3], target=1,
                             trigger=trigger)
    assert m == {"val_clean": 1.0, "val_patched_source": 0.0, "asr": 1.0, "n_val_clean": 9, "n_val_patched": 5}
    # a dim trigger that the rule ignores: every patched source stays correct
    m = htba.evaluate_attack(BrightIsTarget(0), {}, x.astype(np.uint8), y, classes=classes, sources=[3], target=1,
                             trigger=T.patch(2, 3, color=0.5))
    assert (m["val_patched_source"], m["asr"]) == (1.0, 0.0)
    patched = htba.patch_images(np.zeros((5, 12, 12, 3), np.uint8), trigger, seed=0)
    assert patched.dtype == np.uint8 and [int((p == 255).all(-1).sum()) for p in patched] == [4] * 5
    with pytest.raises(ConfigError, match="must be distinct classes"):
        htba.evaluate_attack(BrightIsTarget(0), {}, x, y, classes=classes, sources=[1], target=1, trigger=trigger)


def test_finetune_set_labels_poisons_as_target_and_maps_classes():
    x = np.zeros((4, 5, 5, 3), np.uint8)
    poisons = np.full((3, 5, 5, 3), 9, np.uint8)
    xs, ys = htba.finetune_set(x, [8, 2, 2, 8], poisons, classes=(2, 8), target=8)
    assert xs.shape == (7, 5, 5, 3) and ys.tolist() == [1, 0, 0, 1, 1, 1, 1] and ys.dtype == np.int32
    np.testing.assert_array_equal(xs[4:], poisons)
    with pytest.raises(ConfigError, match="target 5 is not among"):
        htba.finetune_set(x, [8, 2, 2, 8], poisons, classes=(2, 8), target=5)
    with pytest.raises(DataError, match="uint8 images"):
        htba.finetune_set(x, [8, 2, 2, 8], poisons / 255.0, classes=(2, 8), target=8)
    with pytest.raises(DataError, match=r"labels \[4\] are not among"):
        htba.class_index([2, 4], (2, 8))


def test_with_new_head_rejects_mismatched_pretrained_layers():
    layer = lambda n_in, n_out: {"kernel": np.zeros((n_in, n_out)), "bias": np.zeros(n_out)}  # noqa: E731
    a = {"params": {"fc7": layer(8, 8), "fc8": layer(8, 3)}}
    b = {"params": {"fc7": layer(8, 16), "fc8": layer(16, 2)}}
    with pytest.raises(ConfigError, match="pretrained layer 'fc7' has shapes"):
        htba.with_new_head(a, b)
    with pytest.raises(ConfigError, match=r"head layers \['fc9'\] are not in the model"):
        htba.with_new_head(a, b, heads=("fc9",))
    with pytest.raises(ConfigError, match="have no layer 'fc6'"):
        htba.with_new_head(a, {"params": {**b["params"], "fc6": layer(8, 8)}}, heads=("fc7", "fc8"))


def test_pairs_and_pair_data_splits():
    pairs = random_pairs(10, 6, seed=3)
    assert pairs == random_pairs(10, 6, seed=3) and len(set(pairs)) == 6 and all(s != t for s, t in pairs)
    assert htba.other_classes(10, pairs[0]) == [c for c in range(10) if c not in pairs[0]]
    inside = random_pairs(10, 12, seed=0, among=(0, 3, 5, 8))  # all 12 ordered pairs of 4 classes
    assert sorted(inside) == sorted((s, t) for s in (0, 3, 5, 8) for t in (0, 3, 5, 8) if s != t)
    with pytest.raises(ConfigError, match="cannot draw 13 distinct pairs"):
        random_pairs(10, 13, seed=0, among=(0, 3, 5, 8))

    class DS:  # the two fields split_pair_data reads; image value = its index, so overlaps are visible
        y_train = np.repeat(np.arange(3), 20)
        x_train = np.arange(60).reshape(60, 1, 1, 1)
    xc, yc, starts = split_pair_data(DS, [0, 2], target=2, n_clean_per_class=8, n_poisons=10, seed=0)
    assert sorted(np.bincount(yc).tolist()) == [0, 8, 8] and len(starts) == 10
    assert set(starts.ravel()) <= set(range(40, 60)) and not set(starts.ravel()) & set(xc.ravel())
    with pytest.raises(ConfigError, match="class 2 has 20 training images, the run needs 21"):
        split_pair_data(DS, [0, 2], target=2, n_clean_per_class=8, n_poisons=13, seed=0)
