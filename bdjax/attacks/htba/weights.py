"""AlexNet feature-extractor weights from a user's file, in torchvision's names and layout.

HTBA reads fc7 of an ImageNet-pretrained AlexNet. bdjax never unpickles, so a torch checkpoint must first be
exported to `.safetensors` (read with the `safetensors` package, which parses a JSON header and raw buffers and
never runs code) or `.npz` (read with `allow_pickle=False`). Expected tensors, for
`get_model("alexnet", num_classes)` with the default widths (C = 64, 192, 384, 256, 256; F = 4096, 4096):

    name                    torch shape (what the file holds)   bdjax parameter            conversion
    features.0.weight       (64, 3, 11, 11)       OIHW           conv1/kernel (11,11,3,64)  transpose(2, 3, 1, 0)
    features.0.bias         (64,)                                conv1/bias
    features.3.weight/bias  (192, 64, 5, 5)                      conv2
    features.6.weight/bias  (384, 192, 3, 3)                     conv3
    features.8.weight/bias  (256, 384, 3, 3)                     conv4
    features.10.weight/bias (256, 256, 3, 3)                     conv5
    classifier.1.weight     (4096, 9216)          CHW columns    fc6/kernel (9216, 4096)    see below
    classifier.1.bias       (4096,)                              fc6/bias
    classifier.4.weight/bias (4096, 4096)                        fc7                        W.T
    classifier.6.weight/bias (num_classes, 4096)                 fc8                        W.T (optional, see key)

fc6: torchvision flattens pool5 as (C, 6, 6) and bdjax as (6, 6, C), so the rows of the bdjax kernel are the
torch columns permuted: `W.reshape(4096, 256, 6, 6).transpose(2, 3, 1, 0).reshape(9216, 4096)`.
Narrower models (other `conv_widths`/`fc_widths`) expect the same names with their own sizes. The tensor names
are exactly those of `torchvision.models.alexnet().state_dict()`, so an export is

    from safetensors.torch import save_file
    save_file(torchvision.models.alexnet(weights="IMAGENET1K_V1").state_dict(), "alexnet.safetensors")

(safetensors needs contiguous tensors; torchvision's are). Inputs are [0, 1] images: bdjax's AlexNet applies
the ImageNet mean/std itself, as torchvision's preprocessing does. fc8 is only the classifier: a file without
`classifier.6.*` loads when `key` is given, fc8 then freshly initialised (HTBA finetunes it anyway).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.errors import ConfigError, DataError
from bdjax.models import AlexNetFeatures, get_model
from bdjax.models.common import torch_bias_init, torch_kernel_init

# bdjax layer -> torchvision module prefix
TORCH_NAMES = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
               "conv5": "features.10", "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}
_CONV_KERNELS = {"conv1": 11, "conv2": 5, "conv3": 3, "conv4": 3, "conv5": 3}
FORMATS = (".safetensors", ".npz")


def torch_shapes(model: AlexNetFeatures, channels: int = 3) -> dict[str, tuple[int, ...]]:
    """The tensor names and torch-layout shapes a weights file must hold for `model`."""
    widths = (channels, *model.conv_widths)
    ph, pw = model.pool_output
    fc_in = (model.conv_widths[-1] * ph * pw, *model.fc_widths)
    fc_out = (*model.fc_widths, model.num_classes)
    shapes = {}
    for i, (layer, k) in enumerate(_CONV_KERNELS.items()):
        shapes[f"{TORCH_NAMES[layer]}.weight"] = (widths[i + 1], widths[i], k, k)
        shapes[f"{TORCH_NAMES[layer]}.bias"] = (widths[i + 1],)
    for j, layer in enumerate(("fc6", "fc7", "fc8")):
        shapes[f"{TORCH_NAMES[layer]}.weight"] = (fc_out[j], fc_in[j])
        shapes[f"{TORCH_NAMES[layer]}.bias"] = (fc_out[j],)
    return shapes


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """name -> array from a .safetensors or .npz file; nothing is unpickled."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise DataError(f"weights file {path} must be one of {', '.join(FORMATS)} (pickled torch files are not read)")
    if not path.is_file():
        raise DataError(f"weights file not found: {path}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        from safetensors.numpy import load_file

        return load_file(str(path))
    except ImportError:
        raise DataError("reading .safetensors needs the safetensors package: pip install safetensors") from None
    except Exception as e:  # a corrupt archive or header: one line naming the file
        raise DataError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None


def _check_model(model) -> AlexNetFeatures:
    if not isinstance(model, AlexNetFeatures):
        raise ConfigError(f"torchvision-layout weights load into bdjax's alexnet, got a {type(model).__name__}")
    return model


def from_torch_layout(tensors: dict[str, np.ndarray], model: AlexNetFeatures, *, key=None) -> dict:
    """Torch-layout tensors -> `{'params': ...}` for `model`; every name and shape is checked first."""
    model = _check_model(model)
    expected = torch_shapes(model)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise DataError(f"weights file has tensor(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                        f"that torchvision's AlexNet does not; expected names: {', '.join(expected)}")
    head = [n for n in expected if n.startswith(TORCH_NAMES["fc8"] + ".")]
    for name, shape in expected.items():
        if name not in tensors:
            if name in head and key is not None:
                continue
            hint = " (or pass key= to initialise fc8)" if name in head else ""
            raise DataError(f"weights file is missing tensor {name} (expected shape {shape}){hint}")
        arr = tensors[name]
        if tuple(arr.shape) != shape:
            raise DataError(f"weights tensor {name} has shape {tuple(arr.shape)}, expected {shape} "
                            f"(torch layout, for alexnet with conv_widths {tuple(model.conv_widths)}, "
                            f"fc_widths {tuple(model.fc_widths)}, num_classes {model.num_classes})")
        if not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"weights tensor {name} must be floating point, got {arr.dtype}")
    params = {}
    ph, pw = model.pool_output
    c5 = model.conv_widths[-1]
    for layer, prefix in TORCH_NAMES.items():
        if f"{prefix}.weight" not in tensors:
            continue
        w = np.asarray(tensors[f"{prefix}.weight"], np.float32)
        if layer in _CONV_KERNELS:
            kernel = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif layer == "fc6":
            kernel = w.reshape(w.shape[0], c5, ph, pw).transpose(2, 3, 1, 0).reshape(ph * pw * c5, w.shape[0])
        else:
            kernel = w.T
        params[layer] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(tensors[f"{prefix}.bias"], jnp.float32)}
    if "fc8" not in params:  # PyTorch's default Linear init, as the model's own
        k_w, k_b = jax.random.split(jax.random.key(int(key)) if isinstance(key, (int, np.integer)) else key)
        fan_in = model.fc_widths[-1]
        params["fc8"] = {"kernel": torch_kernel_init(k_w, (fan_in, model.num_classes), jnp.float32),
                         "bias": torch_bias_init(fan_in)(k_b, (model.num_classes,))}
    return {"params": params}


def to_torch_layout(variables: dict, model: AlexNetFeatures) -> dict[str, np.ndarray]:
    """The inverse of `from_torch_layout`: bdjax parameters as torchvision-named, torch-layout arrays."""
    model = _check_model(model)
    ph, pw = model.pool_output
    c5 = model.conv_widths[-1]
    out = {}
    for layer, prefix in TORCH_NAMES.items():
        p = jax.device_get(variables["params"][layer])
        k = np.asarray(p["kernel"], np.float32)
        if layer in _CONV_KERNELS:
            w = k.transpose(3, 2, 0, 1)
        elif layer == "fc6":
            w = k.reshape(ph, pw, c5, -1).transpose(3, 2, 0, 1).reshape(k.shape[1], c5 * ph * pw)
        else:
            w = k.T
        out[f"{prefix}.weight"] = np.ascontiguousarray(w)
        out[f"{prefix}.bias"] = np.asarray(p["bias"], np.float32)
    return out


def load_alexnet(path: str | Path, model: AlexNetFeatures | None = None, *, key=None) -> dict:
    """Variables for `model` (default: `get_model("alexnet", 1000)`, torchvision's) from a torch-layout file."""
    model = _check_model(get_model("alexnet", 1000) if model is None else model)
    return from_torch_layout(read_tensors(path), model, key=key)


def save_alexnet(path: str | Path, variables: dict, model: AlexNetFeatures) -> Path:
    """Write `variables` in torchvision's names and layout (.safetensors or .npz, by the suffix)."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise DataError(f"weights file {path} must end in one of {', '.join(FORMATS)}")
    tensors = to_torch_layout(variables, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, **tensors)
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(path))
    return path
