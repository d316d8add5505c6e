"""Model zoo: shapes, named features, BN/dropout modes, registry errors, parameter counts.

Kept fast on CPU: every big model is initialised and run once (batch 2, 32x32), everything
else uses jax.eval_shape or tiny widths.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.errors import ConfigError
from bdjax.models import (
    MODEL_NAMES,
    AlexNetFeatures,
    CifarCNN,
    MadryResNet,
    MnistCNN,
    PreActResNet18,
    ResNet18,
    UlpCNN,
    adaptive_avg_pool,
    count_params,
    feature_shapes,
    get_model,
    init_model,
    select_feature,
)
from bdjax.models.madry_resnet import per_image_standardization

SMALL_ALEXNET = dict(conv_widths=(8, 8, 16, 8, 8), fc_widths=(32, 24))
MADRY_UNITS = [f"stage{s}_unit{u}" for s in (1, 2, 3) for u in range(5)]

# name, kwargs, input shape, penultimate dim, expected feature names, has BatchNorm
CASES = [
    ("mnist_cnn", {}, (28, 28, 1), 128, ["conv1", "conv2"], False),
    ("ulp_cnn", {}, (32, 32, 3), 192, [f"conv{i}" for i in range(1, 7)] + ["fc1", "fc2"], True),
    ("resnet18", {}, (32, 32, 3), 512, ["stem", "layer1", "layer2", "layer3", "layer4"], True),
    ("preact_resnet18", {}, (32, 32, 3), 512, ["stem", "layer1", "layer2", "layer3", "layer4"], True),
    ("madry_resnet", {}, (32, 32, 3), 64, ["stem"] + MADRY_UNITS, True),
    ("alexnet", SMALL_ALEXNET, (32, 32, 3), 24,
     [f"conv{i}" for i in range(1, 6)] + ["pool5", "fc6", "fc7"], False),
    ("cifar_cnn", {}, (32, 32, 3), 128, [f"conv{i}" for i in range(1, 7)], True),
]


def _key(seed=0):
    # rbg keys compile ~2x faster than threefry on CPU; init compile dominates this file.
    return jax.random.key(seed, impl="rbg")


_VARIABLES = {}


def _init(name, kwargs, input_shape):
    """(model, variables), initialised once per configuration for the whole file."""
    cache_key = (name, tuple(sorted(kwargs.items())), input_shape)
    if cache_key not in _VARIABLES:
        model = get_model(name, 10, **kwargs)
        _VARIABLES[cache_key] = (model, init_model(model, _key(), input_shape))
    return _VARIABLES[cache_key]


def _abstract_params(model, input_shape):
    x = jnp.zeros((1, *input_shape), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def _images(shape, batch=2, seed=1):
    return jax.random.uniform(jax.random.key(seed), (batch, *shape), jnp.float32)


def _trees_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b)))


def test_registry():
    assert MODEL_NAMES == ("mnist_cnn", "ulp_cnn", "resnet18", "preact_resnet18", "madry_resnet", "alexnet", "cifar_cnn")
    classes = (MnistCNN, UlpCNN, ResNet18, PreActResNet18, MadryResNet, AlexNetFeatures, CifarCNN)
    for name, cls in zip(MODEL_NAMES, classes):
        model = get_model(name, 7)
        assert type(model) is cls and model.num_classes == 7
    assert isinstance(get_model("ResNet18", 10), ResNet18)
    assert isinstance(get_model("preact-resnet18", 10), PreActResNet18)
    # Config lists become tuples so the module stays hashable.
    model = get_model("alexnet", 3, fc_widths=[8, 8])
    assert model.fc_widths == (8, 8)
    hash(model)


def test_get_model_errors_list_valid_choices():
    with pytest.raises(ConfigError) as err:
        get_model("vgg16", 10)
    assert isinstance(err.value, ValueError)
    assert "vgg16" in str(err.value)
    for name in MODEL_NAMES:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="widht.*valid options.*width"):
        get_model("ulp_cnn", 10, widht=32)
    with pytest.raises(ConfigError, match="num_classes"):
        get_model("mnist_cnn", 0)


@pytest.mark.parametrize("name,kwargs,input_shape,pen_dim,names,has_bn", CASES, ids=[c[0] for c in CASES])
def test_forward_features_and_batchnorm(name, kwargs, input_shape, pen_dim, names, has_bn):
    model, variables = _init(name, kwargs, input_shape)
    assert ("batch_stats" in variables) == has_bn
    x = _images(input_shape)

    logits = model.apply(variables, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))

    out, feats = model.apply(variables, x, features=True)
    assert type(feats) is dict
    assert list(feats) == names + ["penultimate", "logits"]
    np.testing.assert_allclose(out, logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(feats["logits"], logits, rtol=1e-6, atol=1e-6)
    assert feats["penultimate"].shape == (2, pen_dim)
    assert select_feature(feats, "penultimate").shape == (2, pen_dim)

    # eval_shape-derived shapes agree with the real forward pass, in forward order.
    shapes = feature_shapes(model, input_shape)
    assert list(shapes) == list(feats)
    assert shapes == {k: tuple(v.shape[1:]) for k, v in feats.items()}

    if has_bn:
        rngs = {"dropout": jax.random.key(3)}
        _, eval_upd = model.apply(variables, x, train=False, mutable=["batch_stats"])
        assert _trees_equal(eval_upd["batch_stats"], variables["batch_stats"])
        train_logits, train_upd = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
        assert train_logits.shape == (2, 10)
        old = jax.tree.leaves(variables["batch_stats"])
        new = jax.tree.leaves(train_upd["batch_stats"])
        assert len(old) == len(new) > 0
        assert all(not bool(jnp.array_equal(a, b)) for a, b in zip(old, new))


def test_batchnorm_momentum_matches_pytorch():
    model, variables = _init("ulp_cnn", {}, (32, 32, 3))
    x = _images((32, 32, 3), batch=4)
    _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    # bn1 normalises conv1's raw output; recompute it from the params.
    k = variables["params"]["conv1"]["kernel"]
    b = variables["params"]["conv1"]["bias"]
    raw = jax.lax.conv_general_dilated(x, k, (1, 1), ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    batch_mean = raw.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(upd["batch_stats"]["bn1"]["mean"], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)


def test_dropout_only_in_train_mode():
    for name, kwargs in (("ulp_cnn", {}), ("alexnet", SMALL_ALEXNET)):
        model, variables = _init(name, kwargs, (32, 32, 3))
        x = _images((32, 32, 3))

        def train(seed):
            out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"], features=True,
                                 rngs={"dropout": jax.random.key(seed)})
            return out[0]

        a, b, a2 = train(1), train(2), train(1)
        assert not np.allclose(a, b)
        np.testing.assert_array_equal(a, a2)
        # Eval: deterministic and needs no dropout rng.
        np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_madry_spectral_signature_layer():
    shapes = feature_shapes(get_model("madry_resnet", 10), (32, 32, 3))
    assert shapes["stage3_unit2"] == (8, 8, 64)
    assert math.prod(shapes["stage3_unit2"]) == 4096
    assert shapes["stage1_unit4"] == (32, 32, 16) and shapes["stage2_unit0"] == (16, 16, 32)
    # Units per stage and widths are configurable; the residual shortcut is parameter-free.
    small = MadryResNet(filters=(8, 8, 16, 32), num_units=2)
    shapes = feature_shapes(small, (32, 32, 3))
    assert [k for k in shapes if k.startswith("stage")] == [f"stage{s}_unit{u}" for s in (1, 2, 3) for u in (0, 1)]
    assert shapes["penultimate"] == (32,)
    params = _abstract_params(small, (32, 32, 3))["params"]
    assert not any("shortcut" in k for k in params["unit_2_0"])
    with pytest.raises(ConfigError):
        feature_shapes(MadryResNet(filters=(16, 32, 16, 64)), (32, 32, 3))


def test_per_image_standardization_matches_tf():
    x = _images((6, 5, 3), batch=3)
    y = per_image_standardization(x)
    flat = np.asarray(x).reshape(3, -1)
    expected = (flat - flat.mean(1, keepdims=True)) / np.maximum(flat.std(1, keepdims=True), 1 / np.sqrt(90))
    np.testing.assert_allclose(np.asarray(y).reshape(3, -1), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per_image_standardization(3.0 * x + 0.5), y, rtol=1e-4, atol=1e-4)
    # A constant image hits the 1/sqrt(N) floor instead of dividing by zero.
    assert bool(jnp.all(per_image_standardization(jnp.ones((1, 4, 4, 1))) == 0))


def test_mnist_cnn_small_inputs():
    digits = feature_shapes(get_model("mnist_cnn", 10), (8, 8, 1))
    assert digits["conv2"] == (4, 4, 64) and digits["penultimate"] == (128,)
    assert feature_shapes(MnistCNN(), (5, 5, 1))["conv2"] == (1, 1, 64)  # pool skipped
    with pytest.raises(ConfigError, match="5x5"):
        feature_shapes(MnistCNN(), (4, 4, 1))
    with pytest.raises(ConfigError, match="input_shape"):
        feature_shapes(MnistCNN(), (8, 8))


def test_select_feature():
    feats = {"conv1": jnp.ones((2, 4, 4, 3)), "penultimate": jnp.ones((2, 5)), "logits": jnp.ones((2, 10))}
    assert select_feature(feats, "conv1").shape == (2, 48)
    assert select_feature({"x": np.ones((3, 2, 2))}, "x").shape == (3, 4)
    with pytest.raises(ConfigError) as err:
        select_feature(feats, "fc7")
    assert "fc7" in str(err.value)
    for name in feats:
        assert name in str(err.value)


def test_parameter_counts():
    ulp = count_params(_abstract_params(UlpCNN(), (32, 32, 3))["params"])
    conv = 3 * 25 * 64 + 64 + 5 * (64 * 25 * 64 + 64)
    fc = (1024 * 384 + 384) + (384 * 192 + 192) + (192 * 10 + 10)
    bn = 2 * (6 * 64 + 384 + 192)
    assert ulp == conv + fc + bn == 988_554

    r18 = count_params(_abstract_params(ResNet18(), (32, 32, 3))["params"])
    assert abs(r18 - 11_170_000) / 11_170_000 < 0.01
    assert r18 == 11_173_962  # kuangliu ResNet18, 10 classes
    pre = count_params(_abstract_params(PreActResNet18(), (32, 32, 3))["params"])
    assert abs(pre - r18) / r18 < 0.01

    madry = _abstract_params(MadryResNet(), (32, 32, 3))
    assert 0.4e6 < count_params(madry["params"]) < 0.5e6


def test_alexnet_224_matches_torchvision_layout():
    model = get_model("alexnet", 1000)
    assert count_params(_abstract_params(model, (224, 224, 3))["params"]) == 61_100_840  # torchvision
    shapes = feature_shapes(get_model("alexnet", 10), (224, 224, 3))
    assert shapes["conv1"] == (55, 55, 64) and shapes["conv5"] == (13, 13, 256)
    assert shapes["pool5"] == (6, 6, 256)
    assert shapes["fc6"] == shapes["fc7"] == shapes["penultimate"] == (4096,)
    assert shapes["logits"] == (10,)
    # Same parameter shapes at 32x32 thanks to the adaptive pool.
    small = jax.tree.map(lambda s: s.shape, _abstract_params(get_model("alexnet", 10), (32, 32, 3)))
    big = jax.tree.map(lambda s: s.shape, _abstract_params(get_model("alexnet", 10), (224, 224, 3)))
    assert small == big


def test_adaptive_avg_pool_matches_pytorch_bins():
    x = jnp.arange(5.0).reshape(1, 5, 1, 1) * jnp.ones((1, 1, 2, 1))
    y = adaptive_avg_pool(x, (3, 2))
    # torch bins for 5 -> 3: [0,2), [1,4), [3,5)
    np.testing.assert_allclose(y[0, :, 0, 0], [0.5, 2.0, 3.5])
    up = adaptive_avg_pool(jnp.full((1, 1, 1, 2), 7.0), (6, 6))
    assert up.shape == (1, 6, 6, 2) and bool(jnp.all(up == 7.0))
    assert adaptive_avg_pool(x, (5, 2)) is x


def test_init_model_jit_and_dtype():
    model = MnistCNN(width=4, hidden=8, dtype=jnp.bfloat16)
    v1 = init_model(model, jax.random.key(0), (8, 8, 1))
    v2 = init_model(model, 0, (8, 8, 1))  # int seed == jax.random.key(seed); compiled once
    assert _trees_equal(v1, v2)
    assert not _trees_equal(v1, init_model(model, 1, (8, 8, 1)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v1))
    apply = jax.jit(model.apply, static_argnames=("train", "features"))
    logits, feats = apply(v1, _images((8, 8, 1)), features=True)
    assert logits.dtype == jnp.float32 and feats["penultimate"].shape == (2, 8)


def test_reshape_max_pool_matches_flax_max_pool_and_its_gradient():
    import flax.linen as nn

    from bdjax.models.common import max_pool

    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3))  # odd height: the last row is dropped (VALID)
    np.testing.assert_array_equal(max_pool(x, 2), nn.max_pool(x, (2, 2), strides=(2, 2)))
    g_ours = jax.grad(lambda x: jnp.sum(max_pool(x, 2) ** 2))(x)
    g_flax = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) ** 2))(x)
    np.testing.assert_allclose(g_ours, g_flax, rtol=1e-6)  # no ties in random normals


@pytest.mark.parametrize("impl", ["gemm", "gemm_dw"])
@pytest.mark.parametrize("stride, padding, kernel", [(1, 0, 3), (1, 2, 5), (2, 1, 3)])
def test_gemm_conv_equals_xla_conv_forward_and_gradients(stride, padding, kernel, impl):
    from bdjax.models.common import gemm_conv, gemm_dw_conv

    conv = {"gemm": gemm_conv, "gemm_dw": gemm_dw_conv}[impl]

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 9, 11, 3))
    w = jax.random.normal(kw, (kernel, kernel, 3, 4))
    args = ((stride, stride), ((padding, padding), (padding, padding)))
    dn = ("NHWC", "HWIO", "NHWC")
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=dn)
    alt = lambda x, w: conv(x, w, *args, dimension_numbers=dn)
    np.testing.assert_allclose(alt(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(lambda x, w: (ref(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
    g_alt = jax.grad(lambda x, w: (alt(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(g_alt, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["gemm", "gemm_dw"])
def test_gemm_models_match_xla_models_under_vmap_over_a_population(impl):
    xla, alt = get_model("mnist_cnn", 10, width=4, hidden=8), get_model("mnist_cnn", 10, width=4, hidden=8, conv_impl=impl)
    stacked = jax.vmap(lambda k: init_model(xla, k, (8, 8, 1)))(jax.random.split(jax.random.key(0), 3))
    x = jax.random.uniform(jax.random.key(1), (5, 8, 8, 1))
    run = lambda m: jax.vmap(lambda v: m.apply(v, x))(stacked)
    np.testing.assert_allclose(run(alt), run(xla), rtol=1e-5, atol=1e-5)
    # and the parameter gradients of a population (the custom VJP under vmap)
    grads = lambda m: jax.vmap(jax.grad(lambda v: jnp.sum(m.apply(v, x) ** 2)))(stacked)
    chex.assert_trees_all_close(grads(alt), grads(xla), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="conv impl"):
        init_model(get_model("mnist_cnn", 10, conv_impl="fft"), 0, (8, 8, 1))
