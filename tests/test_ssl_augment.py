"""SSL augmentations: each op against a hand-computed case, and the statistics of the random recipe."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax.errors import ConfigError
from bdjax.ssl import augment as A

IDENTITY = A.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                           flip_p=0.0)


def test_resized_crop_by_hand():
    img = jnp.arange(16, dtype=jnp.float32).reshape(4, 4, 1)
    np.testing.assert_allclose(A.resized_crop(img, jnp.array([0., 0., 4., 4.]), (4, 4)), img)
    # the 2x2 box at (1, 1) = [[5, 6], [9, 10]] upsampled 2x: half-pixel centres, edges clamped to the box
    out = np.asarray(A.resized_crop(img, jnp.array([1., 1., 2., 2.]), (4, 4)))[..., 0]
    row = lambda a, b: [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]
    top, bottom = np.array(row(5, 6)), np.array(row(9, 10))
    expected = np.stack([top, 0.75 * top + 0.25 * bottom, 0.25 * top + 0.75 * bottom, bottom])
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_crop_boxes_follow_scale_and_ratio():
    sample = jax.jit(A.sample_crop_boxes, static_argnums=(1, 2, 3, 4, 5))
    boxes = np.asarray(sample(jax.random.key(0), 4000, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3)))
    top, left, h, w = boxes.T
    area = h * w / 1024
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert area.min() >= 0.17 and area.max() <= 1.0  # 0.2 up to integer rounding of the sides
    # area ~ U(0.2, 1) except boxes that do not fit: its mean is near 0.6, and small crops are common
    assert 0.5 < area.mean() < 0.65 and np.mean(area < 0.4) > 0.2
    sq = np.asarray(sample(jax.random.key(1), 50, 32, 32, (0.5, 0.5), (1.0, 1.0)))
    assert (sq[:, 2] == 23).all() and (sq[:, 3] == 23).all()  # round(sqrt(0.5 * 1024)) = 23


def test_color_jitter_by_hand():
    x = jax.random.uniform(jax.random.key(0), (4, 4, 3))
    jitter = jax.jit(A.color_jitter_one)
    np.testing.assert_allclose(jitter(x, jnp.array([0.5, 1, 1, 0])), 0.5 * x, atol=1e-6)
    flat = jitter(x, jnp.array([1, 0, 1, 0]))  # contrast 0: every pixel = the channel mean
    np.testing.assert_allclose(flat, jnp.broadcast_to(x.mean((0, 1)), x.shape), atol=1e-6)
    red = jnp.zeros((2, 2, 3)).at[..., 0].set(1.0)
    np.testing.assert_allclose(jitter(red, jnp.array([1, 1, 1, 1 / 3])), jnp.roll(red, 1, -1), atol=1e-5)
    np.testing.assert_allclose(jitter(x, jnp.array([1, 1, 0, 0]))[..., 0],  # saturation 0: grey
                               jnp.max(x, -1), atol=1e-5)
    g = np.asarray(A.grayscale(x[None]))[0]
    np.testing.assert_allclose(g[..., 1], x @ jnp.array([0.2989, 0.5870, 0.1140]), atol=1e-6)
    assert np.allclose(g[..., 0], g[..., 2])


def test_gaussian_blur_by_hand():
    img = jnp.zeros((1, 5, 5, 1)).at[0, 2, 2, 0].set(1.0)
    out = np.asarray(A.gaussian_blur(img, jnp.array([1.0]), 3))[0, ..., 0]
    w = np.array([np.exp(-0.5), 1, np.exp(-0.5)])
    w /= w.sum()
    np.testing.assert_allclose(out[1:4, 1:4], np.outer(w, w), atol=1e-6)
    assert out.sum() == pytest.approx(1.0) and out[0].sum() == 0
    const = jnp.full((1, 6, 6, 3), 0.3)
    np.testing.assert_allclose(A.gaussian_blur(const, jnp.array([2.0]), 5), const, atol=1e-6)
    assert A.blur_kernel_size(32, 0.1) == 3 and A.blur_kernel_size(224, 0.1) == 23


def test_each_op_fires_with_its_probability():
    cfg = A.AugmentConfig()
    d = jax.jit(lambda k: A.draw(k, 20000, 32, cfg))(jax.random.key(4))
    for name, p in [("jitter_on", 0.8), ("gray_on", 0.2), ("blur_on", 0.5), ("flip_on", 0.5)]:
        assert float(np.mean(d[name])) == pytest.approx(p, abs=0.012), name
    sigma, f = np.asarray(d["sigma"]), np.asarray(d["jitter"])
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and sigma.mean() == pytest.approx(1.05, abs=0.02)
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and np.abs(f[:, 3]).max() <= 0.1


def test_the_masks_switch_the_ops_on_and_off():
    x = jax.random.uniform(jax.random.key(3), (4, 6, 6, 3))
    d = A.draw(jax.random.key(0), 4, 6, IDENTITY)
    apply = jax.jit(A.apply_draw, static_argnums=2)
    np.testing.assert_allclose(apply(x, d, IDENTITY), x, atol=1e-6)  # everything off: unchanged
    flips = {**d, "flip_on": jnp.array([True, False, True, False])}
    out = np.asarray(apply(x, flips, IDENTITY))
    np.testing.assert_allclose(out[0], x[0, :, ::-1], atol=1e-6)
    np.testing.assert_allclose(out[1], x[1], atol=1e-6)
    grey = np.asarray(apply(x, {**d, "gray_on": jnp.array([True, False, False, False])},
                            dataclasses.replace(IDENTITY, gray_p=0.5)))
    assert np.allclose(grey[0, ..., 0], grey[0, ..., 2]) and not np.allclose(grey[1, ..., 0], grey[1, ..., 2])


def test_two_views_differ_and_stay_in_range():
    x = jax.random.uniform(jax.random.key(0), (8, 8, 8, 3))
    v1, v2 = jax.jit(A.two_views)(jax.random.key(1), x)
    assert v1.shape == x.shape and not np.allclose(v1, v2)
    assert float(v1.min()) >= -1e-6 and float(v1.max()) <= 1 + 1e-6


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.2, 1.5), (0.8, 0.5)])
def test_a_crop_scale_outside_0_1_is_a_config_error(scale):
    with pytest.raises(ConfigError, match="augment.crop_scale"):
        A.AugmentConfig(crop_scale=scale).validate()
