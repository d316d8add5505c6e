"""TFDS through bdjax.load_dataset, without TensorFlow: tiny datasets that TFDS itself prepares offline in tmp dirs.

Each test runs with TensorFlow hidden from the import system, so an install of it cannot make them pass.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bdjax.data import load_dataset
from bdjax.data import tfds_source
from bdjax.errors import DataError

if os.environ.get("CI", "").lower() == "true":
    import tensorflow_datasets as tfds  # in the test extra: on CI these tests must run, not skip
else:
    tfds = pytest.importorskip("tensorflow_datasets")

REPO = Path(__file__).resolve().parents[1]


def images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def make_builder(name: str, splits: dict, features: dict, *, registered: bool,
                 supervised=("image", "label")) -> type:
    """A GeneratorBasedBuilder class; registered ones are found by name like catalog datasets."""

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     supervised_keys=supervised)

    def _split_generators(self, dl_manager):
        if self.url:  # set by a test: fetch it as a catalog builder fetches its source files
            dl_manager.download(self.url)
        return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):
        if type(self).broken:
            raise AssertionError(f"{name} regenerated although it is prepared")
        yield from enumerate(splits[split]())

    body = dict(name=name, VERSION=tfds.core.Version("1.0.0"), __module__=__name__, broken=False, url=None,
                _info=_info, _split_generators=_split_generators, _generate_examples=_generate_examples)
    return types.new_class(name, (tfds.core.GeneratorBasedBuilder,), {"skip_registration": not registered},
                           lambda ns: ns.update(body))


# What goes in: PIL images (TFDS encodes those to PNG without TensorFlow), deterministic pixels and labels.
RGB = {"train": images(7, (5, 4, 3), 0), "test": images(3, (5, 4, 3), 1)}
RGB_Y = {"train": [2, 0, 1, 1, 2, 0, 0], "test": [1, 2, 0]}
GRAY = {"train": images(5, (6, 3), 2), "validation": images(4, (6, 3), 3)}
GRAY_Y = {"train": [1, 0, 1, 1, 0], "validation": [0, 1, 1, 0]}
RGB_FEATURES = {"image": tfds.features.Image(shape=(5, 4, 3)),
                "label": tfds.features.ClassLabel(names=["cat", "dog", "eel"])}


def pil_split(arrays: dict, labels: dict, split: str):
    return lambda: ({"image": Image.fromarray(x), "label": y} for x, y in zip(arrays[split], labels[split]))


RGB_SPLITS = {s: pil_split(RGB, RGB_Y, s) for s in RGB}

# Registered once per process (TFDS refuses a second class with the same name): the catalog's code path.
CATALOG_LIKE = make_builder("bdjax_test_catalog", RGB_SPLITS, RGB_FEATURES, registered=True)
NEEDS_TF = make_builder(  # numpy images: TFDS PNG-encodes them with TensorFlow, as mnist's builder does
    "bdjax_test_numpy_images", {s: (lambda s=s: ({"image": x, "label": y} for x, y in zip(RGB[s], RGB_Y[s])))
                                for s in RGB}, RGB_FEATURES, registered=True)
OFFLINE = make_builder("bdjax_test_offline", RGB_SPLITS, RGB_FEATURES, registered=True)
BAD_FEATURES = {
    "bdjax_test_vectors": ({"x": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                            "label": tfds.features.ClassLabel(num_classes=2)}, ("x", "label"),
                           r"feature 'x' is Tensor of float32 shape \(3,\), expected uint8 images .*not an image"),
    "bdjax_test_any_size": ({"image": tfds.features.Image(shape=(None, None, 3)),
                             "label": tfds.features.ClassLabel(num_classes=2)}, ("image", "label"),
                            r"feature 'image' is Image of shape \(None, None, 3\), expected images of one fixed"),
    "bdjax_test_rgba": ({"image": tfds.features.Image(shape=(4, 4, 4)),
                         "label": tfds.features.ClassLabel(num_classes=2)}, ("image", "label"),
                        "feature 'image' is Image with 4 channels, expected 1 or 3"),
    "bdjax_test_text_label": ({"image": tfds.features.Image(shape=(4, 4, 3)), "label": tfds.features.Text()},
                              ("image", "label"), r"label feature 'label' is Text of object shape \(\), expected one "
                              "integer class per example"),
    "bdjax_test_no_label": ({"picture": tfds.features.Image(shape=(4, 4, 3)), "id": tfds.features.Text()}, None,
                            r"has features \['id', 'picture'\], expected an image and a label"),
}
for _name, (_features, _keys, _) in BAD_FEATURES.items():
    make_builder(_name, {"train": lambda: iter(())}, _features, registered=True, supervised=_keys)


class _HideTensorFlow:
    """Wraps a meta-path finder so that it never finds tensorflow: `import tensorflow` fails and
    importlib.util.find_spec("tensorflow") is None, as when it is not installed. (sys.modules["tensorflow"] = None
    would not do: TFDS takes any "tensorflow" key there as TensorFlow being loaded.)"""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "tensorflow" or fullname.startswith("tensorflow."):
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(fullname, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


def block_tensorflow(m: pytest.MonkeyPatch) -> None:
    assert "tensorflow" not in sys.modules, "TensorFlow already imported: these tests need a process without it"
    m.setattr(sys, "meta_path", [_HideTensorFlow(f) for f in sys.meta_path])


@pytest.fixture(autouse=True)
def no_tensorflow(monkeypatch):
    block_tensorflow(monkeypatch)


@pytest.fixture
def no_local(tmp_path):
    """A data root without the names, so load_dataset goes to TFDS."""
    (tmp_path / "root").mkdir()
    return str(tmp_path / "root")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data_dir holding two datasets prepared by TFDS from builders that are not registered: only the files."""
    data_dir = tmp_path_factory.mktemp("tfds")
    with pytest.MonkeyPatch.context() as m:
        block_tensorflow(m)
        make_builder("bdjax_files_rgb", RGB_SPLITS, RGB_FEATURES, registered=False)(
            data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
        make_builder("bdjax_files_gray", {s: pil_split(GRAY, GRAY_Y, s) for s in GRAY},
                     {"image": tfds.features.Image(shape=(6, 3, 1)), "label": tfds.features.Scalar(np.int64)},
                     registered=False)(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return data_dir


def assert_same_examples(x: np.ndarray, y: np.ndarray, x_in: np.ndarray, y_in: list[int]) -> None:
    """x, y hold exactly the examples that went in (TFDS stores a split shuffled, so compare as a mapping)."""
    assert x.dtype == np.uint8 and y.dtype == np.int32 and len(x) == len(y) == len(x_in)
    want = {img.tobytes(): label for img, label in zip(x_in, y_in)}
    assert len(want) == len(x_in)  # the random images are distinct, so the mapping is one-to-one
    assert {img.tobytes(): int(label) for img, label in zip(x, y)} == want


def test_prepared_data_dir_streamed_in_chunks(prepared, no_local, monkeypatch):
    monkeypatch.setattr(tfds_source, "CHUNK", 3)
    reads = []
    from tensorflow_datasets.core.data_sources.array_record import ArrayRecordDataSource as cls

    real = cls.__getitems__
    monkeypatch.setattr(cls, "__getitems__", lambda self, keys: reads.append(list(keys)) or real(self, keys))
    ds = load_dataset("bdjax_files_rgb", data_root=no_local, data_dir=str(prepared))
    assert ds.name == "bdjax_files_rgb" and ds.class_names == ("cat", "dog", "eel")
    assert ds.x_train.shape == (7, 5, 4, 3) and ds.x_test.shape == (3, 5, 4, 3)
    assert_same_examples(ds.x_train, ds.y_train, RGB["train"], RGB_Y["train"])
    assert_same_examples(ds.x_test, ds.y_test, RGB["test"], RGB_Y["test"])
    assert reads == [[0, 1, 2], [3, 4, 5], [6], [0, 1, 2]]  # 3 at a time, never a whole split
    # bdjax keeps TFDS's stored order.
    direct = tfds.data_source("bdjax_files_rgb", split="train", data_dir=str(prepared))
    np.testing.assert_array_equal(ds.x_train, np.stack([ex["image"] for ex in direct]))
    assert ds.y_train.tolist() == [ex["label"] for ex in direct]


def test_prepared_gray_with_validation_split_and_plain_integer_labels(prepared, no_local):
    ds = load_dataset("bdjax_files_gray", data_root=no_local, data_dir=str(prepared))
    assert ds.class_names == ("0", "1") and ds.image_shape == (6, 3, 1)  # no ClassLabel: named by number
    assert ds.x_train.shape == (5, 6, 3, 1) and ds.x_test.shape == (4, 6, 3, 1)  # validation stands in for test
    assert_same_examples(ds.x_train[..., 0], ds.y_train, GRAY["train"], GRAY_Y["train"])
    assert_same_examples(ds.x_test[..., 0], ds.y_test, GRAY["validation"], GRAY_Y["validation"])


def test_catalog_builder_prepared_as_array_record_then_reused(tmp_path, no_local, monkeypatch, capsys):
    monkeypatch.setenv("BDJAX_PROGRESS", "1")
    data_dir = tmp_path / "tfds"
    ds = load_dataset("bdjax_test_catalog", data_root=no_local, data_dir=str(data_dir))
    assert ds.class_names == ("cat", "dog", "eel")
    assert_same_examples(ds.x_train, ds.y_train, RGB["train"], RGB_Y["train"])
    assert_same_examples(ds.x_test, ds.y_test, RGB["test"], RGB_Y["test"])
    files = sorted(p.name for p in (data_dir / "bdjax_test_catalog" / "1.0.0").iterdir())
    assert "bdjax_test_catalog-train.array_record-00000-of-00001" in files
    assert "TFDS bdjax_test_catalog" in capsys.readouterr().err  # the streaming progress bar
    monkeypatch.setattr(CATALOG_LIKE, "broken", True)  # a second load must read the files, not regenerate
    again = load_dataset("bdjax_test_catalog", data_root=no_local, data_dir=str(data_dir))
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)


def test_builder_that_needs_tensorflow(tmp_path, no_local):
    with pytest.raises(DataError, match=r"^preparing TFDS dataset 'bdjax_test_numpy_images' needs TensorFlow") as e:
        load_dataset("bdjax_test_numpy_images", data_root=no_local, data_dir=str(tmp_path / "tfds"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "tfds" / "bdjax_test_numpy_images" / "1.0.0").exists()  # nothing half-written kept


def test_download_failure_offline(tmp_path, no_local, monkeypatch):
    with socket.socket() as s:  # a loopback port with nothing listening: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(OFFLINE, "url", f"http://127.0.0.1:{port}/data.bin")
    from tensorflow_datasets.core.download import downloader

    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS otherwise backs off for minutes
    with pytest.raises(DataError, match=r"could not load TFDS dataset 'bdjax_test_offline' "
                                        r"\(ConnectionError: .*\); use a local copy under BDJAX_DATA_ROOT") as e:
        load_dataset("bdjax_test_offline", data_root=no_local, data_dir=str(tmp_path / "tfds"))
    assert "\n" not in str(e.value)


def test_unknown_name(tmp_path, no_local):
    with pytest.raises(DataError, match=r"^unknown dataset 'bdjax_no_such_set': not found locally nor in the TFDS "
                                        r"catalog \(DatasetNotFoundError: Dataset bdjax_no_such_set not found.\)$"):
        load_dataset("bdjax_no_such_set", data_root=no_local, data_dir=str(tmp_path / "tfds"))


@pytest.mark.parametrize("name", sorted(BAD_FEATURES))
def test_unexpected_features_rejected_before_download(name, tmp_path, no_local):
    with pytest.raises(DataError, match=BAD_FEATURES[name][2]) as e:
        load_dataset(name, data_root=no_local, data_dir=str(tmp_path / "tfds"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "tfds" / name).exists()  # rejected from the features alone, nothing prepared


def test_tfrecord_files_need_tensorflow(prepared, tmp_path, no_local):
    # TFDS cannot write tfrecord without TensorFlow; relabel array_record files as tfrecord, as a TF user's would be.
    import shutil

    data_dir = tmp_path / "tfds"
    shutil.copytree(prepared / "bdjax_files_rgb", data_dir / "bdjax_files_rgb")
    info = data_dir / "bdjax_files_rgb" / "1.0.0" / "dataset_info.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"fileFormat": "tfrecord"}))
    with pytest.raises(DataError, match=r"'bdjax_files_rgb' at .* is stored as tfrecord, which needs TensorFlow"):
        load_dataset("bdjax_files_rgb", data_root=no_local, data_dir=str(data_dir))


def test_import_bdjax_does_not_import_tfds():
    code = ("import sys, bdjax, bdjax.data, bdjax.cli\n"
            "bdjax.data.load_dataset('digits')\n"
            "assert 'tensorflow_datasets' not in sys.modules, 'bdjax imported tensorflow_datasets'\n"
            "import tensorflow_datasets\n"  # it is installed: the check above was not vacuous
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), BDJAX_PROGRESS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
