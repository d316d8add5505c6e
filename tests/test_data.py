"""bdjax.data: digits, the local readers (IDX, image folders, .npz), the cache, bad input (TFDS: test_tfds.py)."""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_data_root
from PIL import Image

from bdjax.data import Dataset, default_data_root, load_dataset, validate_dataset
from bdjax.data import folder as folder_mod
from bdjax.data import idx as idx_mod
from bdjax.errors import DataError

# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, arr: np.ndarray, *, magic: bytes | None = None, cut: int = 0) -> None:
    header = magic if magic is not None else bytes([0, 0, 0x08, arr.ndim])
    raw = header + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - cut]
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_idx_dir(root: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 5, 4)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)
    return root


def write_image(path: Path, size: tuple[int, int] = (4, 4), mode: str = "RGB", value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value if mode == "L" else (value, 255 - value, 7)).save(path)


def make_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size=(4, 4), mode="RGB") -> Path:
    for split in ("train", "test"):
        for c in classes:
            for i in range(per_class):
                write_image(root / split / c / f"{i:04d}.png", size, mode, value=10 * i)
    return root


def save_npz(path: Path, **overrides) -> Path:
    arrays = dict(
        x_train=np.zeros((5, 4, 4, 3), np.uint8),
        y_train=np.array([0, 1, 2, 0, 1]),
        x_test=np.zeros((2, 4, 4, 3), np.uint8),
        y_test=np.array([2, 1]),
    )
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


# --------------------------------------------------------------------------- digits and Dataset


def test_digits_shapes_dtype_range_and_classes(monkeypatch):
    monkeypatch.setenv("BDJAX_DATA_ROOT", "/nonexistent/bdjax")  # digits must not touch the file system
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0 and ds.x_train.max() == 255
    assert ds.num_classes == 10 and ds.class_names == tuple("0123456789")
    assert ds.image_shape == (8, 8, 1)
    assert set(np.unique(ds.y_test)) == set(range(10))
    validate_dataset(ds)


def test_digits_is_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


def test_subset_is_seeded_and_checked():
    ds = load_dataset("digits")
    s1, s2, s3 = ds.subset(100, 20, seed=1), ds.subset(100, 20, seed=1), ds.subset(100, 20, seed=2)
    assert s1.x_train.shape == (100, 8, 8, 1) and len(s1.y_test) == 20
    np.testing.assert_array_equal(s1.y_train, s2.y_train)
    assert not np.array_equal(s1.x_train, s3.x_train)
    assert len(ds.subset(n_test=10).y_train) == 1437
    with pytest.raises(DataError, match="n_train"):
        ds.subset(n_train=5000)


def test_validate_dataset_rejects_bad_labels_and_shapes():
    ds = load_dataset("digits")
    bad = Dataset("d", ds.x_train, ds.y_train.copy(), ds.x_test, ds.y_test, ds.class_names)
    bad.y_train[3] = 10
    with pytest.raises(DataError, match=r"y_train: label 10 is outside \[0, 10\)"):
        validate_dataset(bad)
    with pytest.raises(DataError, match="dtype float32, expected uint8"):
        validate_dataset(Dataset("d", ds.x_train.astype(np.float32), ds.y_train, ds.x_test, ds.y_test,
                                 ds.class_names))
    with pytest.raises(DataError, match="train images are"):
        validate_dataset(Dataset("d", ds.x_train, ds.y_train, ds.x_test[:, :4], ds.y_test, ds.class_names))
    with pytest.raises(DataError, match="images but"):
        validate_dataset(Dataset("d", ds.x_train, ds.y_train[:-1], ds.x_test, ds.y_test, ds.class_names))


# --------------------------------------------------------------------------- real data


def test_mnist_raw_file_md5():
    root = require_data_root("mnist")
    raw = gzip.decompress((root / "mnist" / "train-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"


def test_mnist_real():
    require_data_root("mnist")
    ds = load_dataset("mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.class_names == tuple("0123456789")
    assert np.bincount(ds.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.x_train.sum(dtype=np.int64) == 1567298545 and ds.x_test.sum(dtype=np.int64) == 264923200


def test_cifar10_real():
    require_data_root("cifar10")
    ds = load_dataset("cifar10")  # default cache: only the first run ever decodes the JPEGs
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.class_names == ("airplane", "automobile", "bird", "cat", "deer",
                              "dog", "frog", "horse", "ship", "truck")
    assert np.bincount(ds.y_train).tolist() == [5000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert abs(ds.x_train.mean() - 120.69) < 0.05  # JPEG'd CIFAR-10; the original pixels give 120.71


def test_gtsrb_real_by_name_and_by_path():
    root = require_data_root("gtsrb")
    ds = load_dataset("gtsrb")
    assert ds.num_classes == 43 and ds.x_train.shape == (39209, 32, 32, 3) and ds.x_test.shape == (12630, 32, 32, 3)
    assert ds.y_train.dtype == np.int32
    by_path = load_dataset(str(root / "gtsrb" / "gtsrb_32x32.npz"))
    assert by_path.name == "gtsrb_32x32" and np.array_equal(by_path.y_test, ds.y_test)


def test_default_data_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BDJAX_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.setenv("BDJAX_DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="BDJAX_DATA_ROOT"):
        default_data_root()
    with pytest.raises(DataError, match="BDJAX_DATA_ROOT"):
        load_dataset("mnist")


# --------------------------------------------------------------------------- local formats via data_root


def test_idx_reader_gz_and_plain(tmp_path):
    for gz in (True, False):
        root = make_idx_dir(tmp_path / f"toy{gz}", gz=gz)
        ds = load_dataset(f"toy{gz}", data_root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
        assert ds.x_train.shape == (6, 5, 4, 1) and ds.x_test.shape == (4, 5, 4, 1)
        assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 5] and ds.num_classes == 6
        assert ds.name == f"toy{gz}" and root.is_dir()


def test_folder_reader_rgb_and_gray(tmp_path):
    make_folder(tmp_path / "rgb")
    ds = load_dataset(str(tmp_path / "rgb"), cache_dir=str(tmp_path / "cache"))
    assert ds.x_train.shape == (6, 4, 4, 3) and ds.class_names == ("cat", "dog") and ds.name == "rgb"
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.x_train[1, 0, 0].tolist() == [10, 245, 7]
    make_folder(tmp_path / "gray", mode="L")
    assert load_dataset(str(tmp_path / "gray"), cache_dir=str(tmp_path / "cache")).image_shape == (4, 4, 1)
    write_image(tmp_path / "gray" / "test" / "dog" / "rgb.png", mode="RGB", value=3)
    mixed = load_dataset(str(tmp_path / "gray"), cache_dir=str(tmp_path / "cache"))
    assert mixed.image_shape == (4, 4, 3) and mixed.x_test[-1, 0, 0].tolist() == [3, 252, 7]


def test_npz_reader(tmp_path):
    d = tmp_path / "toy"
    d.mkdir()
    save_npz(d / "anything.npz", x_train=np.zeros((5, 4, 4), np.uint8), x_test=np.zeros((2, 4, 4), np.uint8),
             class_names=np.array(["a", "b", "c"]))
    ds = load_dataset("toy", data_root=str(tmp_path))
    assert ds.image_shape == (4, 4, 1) and ds.class_names == ("a", "b", "c") and ds.y_train.dtype == np.int32


def test_pack_dataset_writes_the_seeded_subset_that_loads_back(tmp_path, capsys):
    from conftest import load_script
    from bdjax.ssl import experiment as ssl_experiment

    out = tmp_path / "digits_small.npz"
    assert load_script("scripts/pack_dataset.py").main(["digits", "--out", str(out), "--n-train", "300",
                                                       "--seed", "3"]) == 0
    want = load_dataset("digits").subset(300, None, 3)
    got = load_dataset(str(out))
    for split in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(got, split), getattr(want, split))
    assert got.class_names == want.class_names and "300 training" in capsys.readouterr().out
    # the SSL experiment's subset rule picks the same training images for the same seed (the docstring's promise)
    full = load_dataset("digits")
    idx = ssl_experiment._subset(np.random.default_rng(3), len(full.y_train), 300)
    np.testing.assert_array_equal(full.x_train[idx], want.x_train)


def test_pack_dataset_bad_input_is_one_line(tmp_path, capsys):
    from conftest import load_script
    pack = load_script("scripts/pack_dataset.py")
    assert pack.main(["no_such_dataset_here", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pack_dataset: error:") and "\n" not in err
    assert pack.main(["digits", "--out", str(tmp_path / "x.npz"), "--n-train", "0"]) == 2
    assert "n_train=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pack.main(["digits", "--out", str(tmp_path / "x.bin")])


# --------------------------------------------------------------------------- cache


def test_cache_hit_skips_decoding_and_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    src, cache_dir = make_folder(tmp_path / "toy"), tmp_path / "cache"
    first = load_dataset(str(src), cache_dir=str(cache_dir))
    (cache_file,) = cache_dir.glob("*.npz")

    def boom(*a, **k):
        raise AssertionError("decoder called despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(folder_mod, "decode_folder", boom)
        again = load_dataset(str(src), cache_dir=str(cache_dir))
    np.testing.assert_array_equal(first.x_train, again.x_train)

    cache_file.write_bytes(b"not an npz at all")
    rebuilt = load_dataset(str(src), cache_dir=str(cache_dir))
    np.testing.assert_array_equal(first.x_test, rebuilt.x_test)
    assert np.load(cache_file, allow_pickle=False)["x_train"].shape == (6, 4, 4, 3)


def test_cache_invalidated_when_source_changes(tmp_path, monkeypatch):
    src, cache_dir = make_idx_dir(tmp_path / "toy"), tmp_path / "cache"
    load_dataset("toy", data_root=str(tmp_path), cache_dir=str(cache_dir))
    calls = []
    real = idx_mod.read_idx_dir
    monkeypatch.setattr(idx_mod, "read_idx_dir", lambda p: calls.append(p) or real(p))
    load_dataset("toy", data_root=str(tmp_path), cache_dir=str(cache_dir))
    assert calls == []
    write_idx(src / "t10k-labels-idx1-ubyte.gz", np.array([9, 9, 9, 9]))
    ds = load_dataset("toy", data_root=str(tmp_path), cache_dir=str(cache_dir))
    assert len(calls) == 1 and ds.y_test.tolist() == [9, 9, 9, 9]
    assert len(list(cache_dir.glob("*.npz"))) == 1  # the stale cache was removed


# --------------------------------------------------------------------------- malformed input


def _load(path: Path, tmp_path: Path):
    return load_dataset(str(path), cache_dir=str(tmp_path / "cache"))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _load(tmp_path / "nope", tmp_path)
    with pytest.raises(DataError, match="data_root .* is not an existing directory"):
        load_dataset("mnist", data_root=str(tmp_path / "nope"))


def test_unrecognised_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset found"):
        _load(tmp_path / "empty", tmp_path)


def test_idx_bad_magic(tmp_path):
    root = make_idx_dir(tmp_path / "m")
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((6, 5, 4)), magic=b"\x12\x34\x08\x03")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: bad IDX magic"):
        _load(root, tmp_path)


def test_idx_truncated(tmp_path):
    root = make_idx_dir(tmp_path / "m", gz=False)
    write_idx(root / "t10k-images-idx3-ubyte", np.zeros((4, 5, 4)), cut=7)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: truncated IDX file"):
        _load(root, tmp_path)


def test_idx_truncated_gzip_stream(tmp_path):
    root = make_idx_dir(tmp_path / "m")
    path = root / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: cannot read"):
        _load(root, tmp_path)


def test_idx_count_mismatch(tmp_path):
    root = make_idx_dir(tmp_path / "m")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(DataError, match="6 images but train-labels-idx1-ubyte.gz has 5 labels"):
        _load(root, tmp_path)


def test_idx_missing_file(tmp_path):
    root = make_idx_dir(tmp_path / "m")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing IDX file.*t10k-labels-idx1-ubyte"):
        _load(root, tmp_path)


def test_folder_mixed_sizes(tmp_path):
    root = make_folder(tmp_path / "f")
    write_image(root / "train" / "dog" / "0001.png", size=(5, 4))
    with pytest.raises(DataError, match=r"dog/0001.png: image size 5x4 differs from 4x4"):
        _load(root, tmp_path)


def test_folder_empty_class(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "test" / "cow").mkdir()
    (root / "train" / "cow").mkdir()
    with pytest.raises(DataError, match="train/cow: empty class folder"):
        _load(root, tmp_path)


def test_folder_test_classes_differ(tmp_path):
    root = make_folder(tmp_path / "f")
    write_image(root / "test" / "cow" / "0000.png")
    with pytest.raises(DataError, match=r"test/ classes differ from train/.*only in test: \['cow'\]"):
        _load(root, tmp_path)


def test_folder_missing_test_split(tmp_path):
    root = tmp_path / "f"
    write_image(root / "train" / "cat" / "0000.png")
    with pytest.raises(DataError, match="f: missing test/ folder"):
        _load(root, tmp_path)


def test_folder_corrupt_jpeg(tmp_path):
    root = make_folder(tmp_path / "f")
    good = root / "train" / "cat" / "0000.png"
    Image.new("RGB", (4, 4)).save(root / "train" / "cat" / "cut.jpg")
    jpg = root / "train" / "cat" / "cut.jpg"
    jpg.write_bytes(jpg.read_bytes()[:40])
    with pytest.raises(DataError, match=r"cat/cut.jpg: not a readable image"):
        _load(root, tmp_path)
    jpg.write_text("hello")
    with pytest.raises(DataError, match=r"cat/cut.jpg: not a readable image"):
        _load(root, tmp_path)
    assert good.exists()


def test_npz_missing_key(tmp_path):
    path = save_npz(tmp_path / "d.npz", y_test=None)
    expected = r"missing key\(s\) \['y_test'\]; keys present: \['x_test', 'x_train', 'y_train'\]"
    with pytest.raises(DataError, match=expected):
        _load(path, tmp_path)


def test_npz_labels_out_of_range(tmp_path):
    path = save_npz(tmp_path / "d.npz", y_test=np.array([2, 7]), class_names=np.array(["a", "b", "c"]))
    with pytest.raises(DataError, match=r"y_test: label 7 is outside \[0, 3\)"):
        _load(path, tmp_path)
    path = save_npz(tmp_path / "e.npz", y_train=np.array([0, -1, 0, 0, 0]))
    with pytest.raises(DataError, match=r"y_train: label -1 is outside"):
        _load(path, tmp_path)


def test_npz_bad_arrays(tmp_path):
    with pytest.raises(DataError, match="x_train: dtype float64, expected uint8"):
        _load(save_npz(tmp_path / "a.npz", x_train=np.zeros((5, 4, 4, 3))), tmp_path)
    with pytest.raises(DataError, match="y_train: 3 labels but 5 images"):
        _load(save_npz(tmp_path / "b.npz", y_train=np.array([0, 1, 2])), tmp_path)
    (tmp_path / "c.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="c.npz: not a readable .npz"):
        _load(tmp_path / "c.npz", tmp_path)


def test_unknown_name_without_tfds(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes `import tensorflow_datasets` fail
    with pytest.raises(DataError, match="pip install tensorflow-datasets"):
        load_dataset("no_such_dataset", data_root=str(tmp_path))


# --------------------------------------------------------------------------- issue 12: silent data defects


def test_folder_16bit_png_is_scaled_not_saturated(tmp_path):
    root = make_folder(tmp_path / "f", mode="L")
    wide = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]] * 2, np.uint16)  # 4x4, 16-bit grey
    Image.fromarray(wide).save(root / "train" / "cat" / "wide.png")
    assert Image.open(root / "train" / "cat" / "wide.png").mode == "I;16"
    ds = _load(root, tmp_path)
    got = ds.x_train[ds.y_train == 0][-1, ..., 0]  # sorted last among cat's files
    np.testing.assert_array_equal(got, np.round(wide / 257.0).astype(np.uint8))  # PIL's convert("L") gave 255s
    assert got[0].tolist() == [0, 1, 128, 255]


def test_npz_labels_with_gaps_are_named(tmp_path):
    path = save_npz(tmp_path / "gap.npz", y_train=np.array([0, 1, 3, 0, 1]), y_test=np.array([3, 1]))
    with pytest.raises(DataError, match=r"gap.npz y_train: no image has label\(s\) \[2\]; expected every label 0..3"):
        _load(path, tmp_path)


def test_subset_of_zero_images_is_an_error_not_everything():
    ds = load_dataset("digits")
    with pytest.raises(DataError, match=r"subset n_train=0: expected an integer in \[1, 1437\]"):
        ds.subset(n_train=0)


def test_select_classes_keeps_and_relabels_in_the_given_order():
    from bdjax.config import DataConfig

    ds = load_dataset("digits")
    sub = ds.select_classes((7, 2))
    assert sub.class_names == (ds.class_names[7], ds.class_names[2]) and sub.num_classes == 2
    # label 0 is the old 7, label 1 the old 2, every image of those classes and no other
    np.testing.assert_array_equal(sub.x_train[sub.y_train == 0], ds.x_train[ds.y_train == 7])
    np.testing.assert_array_equal(sub.x_test[sub.y_test == 1], ds.x_test[ds.y_test == 2])
    assert len(sub.y_train) == int(np.isin(ds.y_train, (7, 2)).sum())
    validate_dataset(sub)
    both = DataConfig(classes=(7, 2), n_train=20).load(seed=3)  # classes first, then the seeded subset
    assert len(both.y_train) == 20 and set(np.unique(both.y_train)) <= {0, 1}
    for bad in ((3,), (1, 1), (0, 10), (-1, 2)):
        with pytest.raises(DataError, match=r"data.classes=.*expected at least 2 distinct labels in \[0, 10\)"):
            ds.select_classes(bad)
