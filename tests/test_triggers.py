"""Exact-pixel tests of every trigger kind, and their jit/vmap behaviour."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import triggers as T
from bdjax.errors import BdjaxError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "triggers"


def test_opaque_patch_bottom_right_exact():
    x = np.zeros((8, 8, 1), np.uint8)
    trig = T.patch(3, 1)
    r, c = T.corner_position(x.shape, trig, "bottom_right")
    out = np.asarray(T.apply(jnp.asarray(x), trig, r, c))
    expected = np.zeros_like(x)
    expected[5:, 5:] = 255
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8


@pytest.mark.parametrize("corner,rows,cols", [("top_left", slice(1, 3), slice(1, 3)), ("top_right", slice(1, 3), slice(5, 7)),
                                              ("bottom_left", slice(5, 7), slice(1, 3))])
def test_corners_with_margin(corner, rows, cols):
    trig = T.patch(2, 3, color=(1.0, 0.0, 0.5))
    r, c = T.corner_position((8, 8, 3), trig, corner, margin=1)
    out = np.asarray(T.apply(jnp.zeros((8, 8, 3), jnp.uint8), trig, r, c))
    expected = np.zeros((8, 8, 3), np.uint8)
    expected[rows, cols] = (255, 0, 128)  # 0.5 * 255 = 127.5 rounds half-to-even to 128
    np.testing.assert_array_equal(out, expected)


def test_alpha_patch_mixes():
    x = jnp.full((4, 4, 1), 100, jnp.uint8)
    out = np.asarray(T.apply(x, T.patch(2, 1, color=1.0, alpha=0.5), 0, 0))
    assert out[0, 0, 0] == 178 and out[1, 1, 0] == 178  # round(0.5*100 + 0.5*255) = round(177.5) = 178
    assert (out[2:, :] == 100).all() and (out[:, 2:] == 100).all()


def test_single_pixel_exact():
    x = np.full((6, 6, 3), 7, np.uint8)
    out = np.asarray(T.apply(jnp.asarray(x), T.pixel(3, color=(101 / 255, 0.0, 25 / 255)), 2, 4))
    expected = x.copy()
    expected[2, 4] = (101, 0, 25)
    np.testing.assert_array_equal(out, expected)


def test_pixel_pattern_touches_only_its_pixels():
    x = np.full((8, 8, 1), 50, np.uint8)
    out = np.asarray(T.apply(jnp.asarray(x), T.pixel_pattern(T.DEFAULT_PIXEL_PATTERN, 1), 3, 3))
    changed = {tuple(p) for p in np.argwhere(out[..., 0] != 50)}
    assert changed == {(3 + dy, 3 + dx) for dy, dx in T.DEFAULT_PIXEL_PATTERN}
    assert (out[out != 50] == 255).all()


def test_checkerboard_exact():
    out = np.asarray(T.apply(jnp.zeros((4, 4, 1), jnp.uint8), T.checkerboard(2, 1), 0, 0))
    np.testing.assert_array_equal(out[:2, :2, 0], [[0, 255], [255, 0]])


def test_blend_whole_image():
    x = np.full((4, 4, 3), 200, np.uint8)
    pattern = np.zeros((4, 4, 3), np.uint8)
    pattern[0, 0] = 100
    out = np.asarray(T.apply(jnp.asarray(x), T.blend(pattern, alpha=0.2), 0, 0))
    np.testing.assert_array_equal(out[0, 0], [180, 180, 180])  # 0.8*200 + 0.2*100
    assert (out[1:] == 160).all()  # 0.8*200 + 0.2*0


def test_float_images_keep_dtype_and_range():
    x = jnp.full((5, 5, 1), 0.25, jnp.float32)
    out = T.apply(x, T.patch(1, 1, color=1.0), 4, 4)
    assert out.dtype == jnp.float32 and float(out[4, 4, 0]) == 1.0 and float(out[0, 0, 0]) == 0.25


def test_random_position_jit_vmap_per_sample():
    xs = jnp.zeros((64, 16, 16, 1), jnp.uint8)
    trig = T.patch(3, 1)
    out = np.asarray(jax.jit(T.apply_random, static_argnums=())(jax.random.key(0), xs, trig))
    assert (out.reshape(64, -1) == 255).sum(1).tolist() == [9] * 64  # whole trigger inside every image
    corners = {tuple(np.argwhere(o[..., 0] == 255).min(0)) for o in out}
    assert len(corners) > 10  # positions differ per sample


def test_apply_batch_traced_positions():
    xs = jnp.zeros((3, 6, 6, 1), jnp.uint8)
    out = np.asarray(jax.jit(T.apply_batch)(xs, T.patch(1, 1), jnp.array([0, 1, 2]), jnp.array([5, 4, 3])))
    for i, (r, c) in enumerate([(0, 5), (1, 4), (2, 3)]):
        assert out[i, r, c, 0] == 255 and out[i].sum() == 255


@pytest.mark.parametrize("name,size", [("htba/trigger_10.png", 8), ("ulp_cifar10", 5)])
def test_trigger_from_shared_image_files(name, size):
    path = SHARED / name
    if path.is_dir():
        path = sorted(path.iterdir())[0]
    if not path.exists():
        pytest.skip(f"shared triggers not found at {path}")
    trig = T.from_image(path, size=size, channels=3)
    assert trig.pattern.shape == (size, size, 3) and float(trig.pattern.max()) <= 1.0
    out = np.asarray(T.apply(jnp.zeros((32, 32, 3), jnp.uint8), trig, 0, 0))
    np.testing.assert_array_equal(out[:size, :size], np.round(np.asarray(trig.pattern) * 255).astype(np.uint8))


def test_bad_triggers_raise_clear_errors(tmp_path):
    with pytest.raises(BdjaxError, match="larger than the 8x8 images"):
        T.check_fits(T.patch(9, 1), (8, 8, 1))
    with pytest.raises(BdjaxError, match="3 channels but the images have 1"):
        T.check_fits(T.patch(2, 3), (8, 8, 1))
    with pytest.raises(BdjaxError, match="not found"):
        T.from_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(BdjaxError, match="cannot read trigger image"):
        T.from_image(tmp_path / "bad.png")
    with pytest.raises(BdjaxError, match="colour"):
        T.patch(2, 3, color=2.0)
    with pytest.raises(BdjaxError, match="unknown corner"):
        T.corner_position((8, 8, 1), T.patch(2, 1), "middle")
