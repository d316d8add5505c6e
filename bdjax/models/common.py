"""Shared building blocks: PyTorch/TF-faithful layers, initialisers and feature helpers.

Every bdjax model takes NHWC float32 images in [0, 1] and returns logits, or
``(logits, feats)`` with ``features=True`` where ``feats`` is an ordered plain dict of
named activations (always containing ``"penultimate"`` (B, D) and ``"logits"``).
"""

from __future__ import annotations

import functools

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bdjax.errors import ConfigError

Array = jax.Array
Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PyTorch's default Conv/Linear init (kaiming_uniform with a=sqrt(5)) is U(+-sqrt(1/fan_in));
# matching it keeps training recipes ported from PyTorch papers behaving the same.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch's default bias init U(+-1/sqrt(fan_in)); flax initialisers do not see fan_in."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def gemm_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` for NHWC x HWIO (what nn.Conv calls) as explicit patches times a matrix.

    Why: under ``jax.vmap`` over a population of models (a model axis on the kernel) XLA turns a convolution
    into a grouped convolution, which its CPU backend runs far slower than the plain one; patches built by
    slicing fold the model axis into the batch and the product becomes a batched GEMM. Same numbers as the
    convolution up to float summation order (tests/test_models.py)."""
    if feature_group_count != 1 or any(d != 1 for d in (lhs_dilation or (1, 1))) or any(
            d != 1 for d in (rhs_dilation or (1, 1))):
        raise ConfigError("gemm convolution supports plain (ungrouped, undilated) convolutions only")
    kh, kw, cin, cout = rhs.shape
    sh, sw = window_strides
    x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    cols = [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(cols, axis=-1)  # (N, oh, ow, kh*kw*cin), (i, j, c) order = HWIO rows
    return jnp.einsum("nhwk,ko->nhwo", patches, rhs.reshape(kh * kw * cin, cout), precision=precision,
                      preferred_element_type=preferred_element_type)


def gemm_dw_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, precision=None, preferred_element_type=None):
    """XLA's convolution forward and input gradient, the weight gradient as patches x output gradient (`gemm_conv`'s).

    Why: on some CPUs XLA:CPU's weight-gradient convolution falls far below its forward (session 13's AMD EPYC,
    `python scripts/bench_conv.py --parts`, 32x32, 64->64, batch 64: forward 181 ms, input gradient 221 ms, weight
    gradient 3467 ms, the same weight gradient as patches x output gradient 770 ms). Same values and gradients as
    the convolution up to float summation order (tests/test_models.py)."""
    options = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                   rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                   feature_group_count=feature_group_count, precision=precision,
                   preferred_element_type=preferred_element_type)
    conv = functools.partial(jax.lax.conv_general_dilated, **options)
    by_gemm = functools.partial(gemm_conv, **options)

    def backward(x, w, g):
        return jax.vjp(lambda x: conv(x, w), x)[1](g)[0], jax.vjp(lambda w: by_gemm(x, w), w)[1](g)[0]

    return with_backward(conv, backward)(lhs, rhs)


def with_backward(forward, backward):
    """forward(x, w) whose gradient is backward(x, w, g) -> (dx, dw) instead of the one JAX derives: how a
    convolution gets another formulation of its gradients (gemm_dw_conv; htba.loop_convs)."""
    @jax.custom_vjp
    def f(x, w):
        return forward(x, w)

    f.defvjp(lambda x, w: (forward(x, w), (x, w)), lambda res, g: tuple(backward(*res, g)))
    return f


CONV_IMPLS = ("xla", "gemm", "gemm_dw")
_CONV_FNS = {"xla": jax.lax.conv_general_dilated, "gemm": gemm_conv, "gemm_dw": gemm_dw_conv}


def torch_conv(
    x: Array,
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
    dtype: Dtype = jnp.float32,
    impl: str = "xla",
    name: str | None = None,
) -> Array:
    """``nn.Conv2d(k, stride, padding)`` equivalent; call inside a compact method.

    Explicit symmetric padding (not 'SAME') so strided convs see the same pixels as PyTorch,
    which matters when porting weights. ``impl="gemm"``: the same layer and parameters computed by
    `gemm_conv` (faster for vmapped model populations on CPU); ``impl="gemm_dw"``: only the weight gradient
    by GEMM (`gemm_dw_conv`, for CPUs whose weight-gradient convolution is slow).
    """
    if impl not in CONV_IMPLS:
        raise ConfigError(f"conv impl must be one of {', '.join(CONV_IMPLS)}, got {impl!r}")
    fan_in = kernel * kernel * x.shape[-1]
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=bias,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(fan_in),
        dtype=dtype,
        conv_general_dilated=_CONV_FNS[impl],
        name=name,
    )(x)


def torch_dense(x: Array, features: int, *, dtype: Dtype = jnp.float32, name: str | None = None) -> Array:
    """``nn.Linear`` equivalent (PyTorch default init); call inside a compact method."""
    return nn.Dense(
        features,
        kernel_init=torch_kernel_init,
        bias_init=torch_bias_init(x.shape[-1]),
        dtype=dtype,
        name=name,
    )(x)


def batch_norm(train: bool, *, dtype: Dtype = jnp.float32, epsilon: float = 1e-5, name: str | None = None):
    """BatchNorm with PyTorch semantics: flax momentum 0.9 == torch momentum 0.1, eps 1e-5.

    (Running variance uses the biased batch variance; PyTorch uses the unbiased one, a
    negligible difference for batch sizes used in practice.)
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=epsilon, dtype=dtype, name=name
    )


def normalize(x: Array, mean: Sequence[float] | None, std: Sequence[float] | None) -> Array:
    """Per-channel ``(x - mean) / std`` on [0, 1] inputs; identity when both are None."""
    if mean is None and std is None:
        return x
    if mean is not None:
        x = x - jnp.asarray(mean, x.dtype)
    if std is not None:
        x = x / jnp.asarray(std, x.dtype)
    return x


def flatten(x: Array) -> Array:
    """(B, ...) -> (B, D)."""
    return x.reshape(x.shape[0], -1)


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    # PyTorch AdaptiveAvgPool bins: [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)).
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: Array, output_size: tuple[int, int]) -> Array:
    """Exact ``torch.nn.AdaptiveAvgPool2d`` on NHWC input, for any input size.

    Implemented as two small static averaging matrices (one einsum), so it also upsamples
    by replication when the input is smaller than ``output_size`` (e.g. 1x1 -> 6x6), which
    is what PyTorch does too.
    """
    oh, ow = output_size
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (oh, ow):
        return x
    mh = jnp.asarray(_adaptive_pool_matrix(h, oh), x.dtype)
    mw = jnp.asarray(_adaptive_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("ph,bhwc,qw->bpqc", mh, x, mw)


def max_pool(x: Array, window: int = 2) -> Array:
    """Non-overlapping ``window`` x ``window`` max-pool (stride = window, VALID) on NHWC input.

    A reshape and a max rather than ``nn.max_pool``: XLA:CPU runs reduce-window's gradient
    (select-and-scatter) as slow scatter loops, about 10% of a ULP-CNN train step, while the
    gradient of a plain max is elementwise. Equal forward values; on exact ties inside a
    window the gradient is shared instead of going to one element.
    """
    b, h, w, c = x.shape
    h, w = h // window * window, w // window * window
    x = x[:, :h, :w].reshape(b, h // window, window, w // window, window, c)
    return x.max(axis=(2, 4))


def max_pool_if_fits(x: Array, window: int, stride: int) -> Array:
    """VALID max-pool, skipped when the map is smaller than the window (small inputs)."""
    if min(x.shape[1], x.shape[2]) < window:
        return x
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")


def model_output(logits: Array, feats: dict[str, Array], features: bool):
    """Common tail: logits always float32 (mixed-precision safe), feats only on request."""
    logits = logits.astype(jnp.float32)
    if not features:
        return logits
    feats["logits"] = logits
    return logits, feats


def select_feature(feats: Mapping[str, Array], name: str) -> Array:
    """``feats[name]`` flattened to (B, D); ConfigError listing the layers when unknown."""
    if name not in feats:
        raise ConfigError(
            f"unknown feature layer {name!r}; available layers: {', '.join(feats)}"
        )
    return flatten(feats[name])  # numpy or jax in, same kind out


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree (pass ``variables['params']`` for trainable params).

    Works on real arrays and on ``jax.ShapeDtypeStruct`` trees from ``jax.eval_shape``.
    """
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))
