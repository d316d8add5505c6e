"""AlexNet weights from torchvision-layout files: a numpy port of torchvision's forward pass on the same tensors
gives bdjax's outputs, save/load round trips (.safetensors and .npz), and every misfit is one line naming it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.attacks import htba
from bdjax.attacks.htba.weights import from_torch_layout, read_tensors
from bdjax.errors import ConfigError, DataError
from bdjax.models import get_model
from bdjax.models.common import IMAGENET_MEAN, IMAGENET_STD

TINY = dict(conv_widths=(4, 6, 8, 6, 5), fc_widths=(12, 10))


def _torch_tensors(model, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * (0.5 / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else 1.0)))
            .astype(np.float32) for name, shape in htba.torch_shapes(model).items()}


# torchvision's AlexNet forward, written against PyTorch's documented semantics (NCHW, cross-correlation,
# floor-mode pooling, flatten in C, H, W order, y = x W^T + b), independently of bdjax's layers.
def _conv(x, w, b, stride, pad):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


def _maxpool(x):
    if min(x.shape[2:]) < 3:
        return x
    return np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-1, -2))


def _torch_alexnet(t, x_nchw):
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = (x_nchw - np.array(IMAGENET_MEAN)[None, :, None, None]) / np.array(IMAGENET_STD)[None, :, None, None]
    x = _maxpool(relu(_conv(x, t["features.0.weight"], t["features.0.bias"], 4, 2)))
    x = _maxpool(relu(_conv(x, t["features.3.weight"], t["features.3.bias"], 1, 2)))
    x = relu(_conv(x, t["features.6.weight"], t["features.6.bias"], 1, 1))
    x = relu(_conv(x, t["features.8.weight"], t["features.8.bias"], 1, 1))
    x = _maxpool(relu(_conv(x, t["features.10.weight"], t["features.10.bias"], 1, 1)))
    assert x.shape[2:] == (6, 6)  # 224x224 input: the adaptive pool is the identity
    x = x.reshape(len(x), -1)
    fc6 = relu(x @ t["classifier.1.weight"].T + t["classifier.1.bias"])
    fc7 = relu(fc6 @ t["classifier.4.weight"].T + t["classifier.4.bias"])
    return fc7, fc7 @ t["classifier.6.weight"].T + t["classifier.6.bias"]


@pytest.fixture(scope="module")
def tiny():
    model = get_model("alexnet", 5, **TINY)
    return model, _torch_tensors(model)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_loaded_weights_reproduce_torchvision_forward(tiny, tmp_path, suffix):
    model, tensors = tiny
    path = tmp_path / f"alexnet{suffix}"
    if suffix == ".npz":
        np.savez(path, **tensors)
    else:
        from safetensors.numpy import save_file
        save_file(tensors, str(path))
    variables = htba.load_alexnet(path, model)
    x = np.random.default_rng(1).random((2, 224, 224, 3)).astype(np.float32)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, features=True))(variables, jnp.asarray(x))
    ref_fc7, ref_logits = _torch_alexnet({k: v.astype(np.float64) for k, v in tensors.items()},
                                         x.transpose(0, 3, 1, 2).astype(np.float64))
    assert np.abs(ref_fc7).max() > 0.1  # a live network, not all-zero ReLUs
    np.testing.assert_allclose(feats["fc7"], ref_fc7, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-3, atol=1e-4)


def test_save_then_load_round_trips_exactly(tiny, tmp_path):
    model, tensors = tiny
    variables = from_torch_layout(tensors, model)
    for suffix in (".safetensors", ".npz"):
        path = htba.save_alexnet(tmp_path / f"w{suffix}", variables, model)
        back = read_tensors(path)
        assert set(back) == set(tensors)
        for name in tensors:
            np.testing.assert_array_equal(back[name], tensors[name])
        again = htba.load_alexnet(path, model)
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
            np.testing.assert_array_equal(a, b)


def test_default_shapes_are_torchvisions():
    shapes = htba.torch_shapes(get_model("alexnet", 1000))
    assert shapes["features.0.weight"] == (64, 3, 11, 11) and shapes["features.10.weight"] == (256, 256, 3, 3)
    assert shapes["classifier.1.weight"] == (4096, 9216) and shapes["classifier.6.weight"] == (1000, 4096)
    assert len(shapes) == 16


def test_missing_head_loads_with_a_key_only(tiny, tmp_path):
    model, tensors = tiny
    body = {k: v for k, v in tensors.items() if not k.startswith("classifier.6.")}
    np.savez(tmp_path / "body.npz", **body)
    with pytest.raises(DataError, match=r"missing tensor classifier\.6\.(weight|bias) .*key="):
        htba.load_alexnet(tmp_path / "body.npz", model)
    v = htba.load_alexnet(tmp_path / "body.npz", model, key=0)
    assert v["params"]["fc8"]["kernel"].shape == (10, 5)
    np.testing.assert_array_equal(v["params"]["fc7"]["kernel"], tensors["classifier.4.weight"].T)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("features.3.weight"), r"missing tensor features\.3\.weight \(expected shape \(6, 4, 5, 5\)\)"),
    (lambda t: t.update({"features.6.weight": np.zeros((8, 6, 5, 5), np.float32)}),
     r"features\.6\.weight has shape \(8, 6, 5, 5\), expected \(8, 6, 3, 3\)"),
    (lambda t: t.update({"fc.weight": np.zeros((2, 2), np.float32)}), r"tensor\(s\) fc\.weight that torchvision"),
    (lambda t: t.update({"features.0.bias": np.zeros(4, np.int32)}), r"features\.0\.bias must be floating"),
])
def test_misfit_files_name_the_tensor(tiny, tmp_path, edit, message):
    model, tensors = tiny
    tensors = dict(tensors)
    edit(tensors)
    np.savez(tmp_path / "bad.npz", **tensors)
    with pytest.raises(DataError, match=message) as e:
        htba.load_alexnet(tmp_path / "bad.npz", model)
    assert "\n" not in str(e.value)


def test_missing_unreadable_and_pickled_files(tmp_path):
    with pytest.raises(DataError, match="weights file not found"):
        htba.load_alexnet(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(DataError, match="cannot read weights file"):
        htba.load_alexnet(tmp_path / "junk.safetensors")
    with pytest.raises(DataError, match="pickled torch files are not read"):
        htba.load_alexnet(tmp_path / "alexnet.pth")
    with pytest.raises(ConfigError, match="load into bdjax's alexnet"):
        htba.load_alexnet(tmp_path / "nope.npz", get_model("mnist_cnn", 10))
