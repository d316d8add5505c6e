"""HTBA poison files: 8-bit PNGs that read back exactly, rounding vs the reference's truncation, the grid figure."""
import numpy as np
import pytest
from PIL import Image

from bdjax.attacks import htba
from bdjax.errors import ConfigError, DataError


def test_rounding_and_truncation_differ_as_expected():
    levels = np.arange(0, 255, dtype=np.float32)
    x = ((levels + 0.6) / 255.0).reshape(1, 15, 17, 1)  # 0.6 of a level above each: rounds up, truncates down
    np.testing.assert_array_equal(htba.to_uint8(x, "round").ravel(), levels + 1)
    np.testing.assert_array_equal(htba.to_uint8(x, "truncate").ravel(), levels)
    below = ((levels + 0.4) / 255.0).reshape(1, 15, 17, 1)  # below half a level: both give the level
    np.testing.assert_array_equal(htba.to_uint8(below, "round"), htba.to_uint8(below, "truncate"))
    assert htba.to_uint8(np.array([[[[1.0, 0.0, 1.5]]]]), "truncate").ravel().tolist() == [255, 0, 255]
    with pytest.raises(ConfigError, match="quantize must be one of round, truncate"):
        htba.to_uint8(x, "ceil")


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("quantize", ["round", "truncate"])
def test_png_round_trip_is_the_quantized_poisons(tmp_path, channels, quantize):
    rng = np.random.default_rng(channels)
    poisons = rng.random((12, 9, 7, channels)).astype(np.float32)
    paths = htba.save_poisons(tmp_path / "p", poisons, quantize=quantize)
    assert [p.name for p in paths[:2]] == ["poison_00000.png", "poison_00001.png"] and len(paths) == 12
    with Image.open(paths[0]) as im:
        assert im.mode == ("RGB" if channels == 3 else "L") and im.format == "PNG"
    back = htba.load_poisons(tmp_path / "p")
    assert back.dtype == np.uint8 and back.shape == poisons.shape
    np.testing.assert_array_equal(back, htba.to_uint8(poisons, quantize))
    assert np.abs(back / 255.0 - poisons).max() <= (0.5 if quantize == "round" else 1.0) / 255 + 1e-6


def test_load_orders_by_index_and_reports_bad_folders(tmp_path):
    imgs = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)])
    htba.save_poisons(tmp_path / "p", imgs)
    (tmp_path / "p" / "notes.txt").write_text("ignored")
    assert htba.load_poisons(tmp_path / "p")[:, 0, 0, 0].tolist() == [10, 20, 30]
    with pytest.raises(DataError, match="poison folder not found"):
        htba.load_poisons(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no poison_NNNNN.png files"):
        htba.load_poisons(tmp_path / "empty")
    with pytest.raises(DataError, match=r"must be \(N, H, W, 1 or 3\)"):
        htba.save_poisons(tmp_path / "q", np.zeros((2, 4, 4, 2), np.float32))


def test_poison_grid_png(tmp_path):
    rng = np.random.default_rng(0)
    targets = rng.random((5, 16, 16, 3)).astype(np.float32)
    poisons = np.clip(targets + rng.uniform(-0.05, 0.05, targets.shape), 0, 1).astype(np.float32)
    path = htba.save_poison_grid(tmp_path / "poisons.png", targets, poisons, eps=16 / 255, n=4)
    with Image.open(path) as im:
        w, h = im.size
    assert (w, h) == (round(1.4 * 4 * 120), round(4.4 * 120))  # 4 columns, 3 rows (target, poison, difference)
    with pytest.raises(DataError, match="of one shape"):
        htba.save_poison_grid(tmp_path / "x.png", targets, poisons[:, :8], eps=0.1)
