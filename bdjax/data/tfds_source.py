"""TensorFlow Datasets catalog names, read without TensorFlow; tensorflow_datasets is imported only when used.

Without TensorFlow, TFDS can read a prepared dataset only through its random-access data sources (array_record
files, images decoded with PIL), and can prepare one only as array_record, and only when the dataset's builder
itself does not call TensorFlow (many catalog image builders do, e.g. to PNG-encode numpy images). tfds.load,
tfds.as_numpy and tfrecord files all need TensorFlow, so bdjax uses none of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from bdjax.data.dataset import Dataset, validate_dataset
from bdjax.errors import DataError

CHUNK = 1024  # examples decoded per read: memory holds one chunk of decoded examples, not a whole split


def _one_line(e: BaseException) -> str:
    # TFDS errors can run to hundreds of lines (DatasetNotFoundError lists the whole catalog).
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _needs_tensorflow(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ImportError) and "tensorflow" in str(seen) and "tensorflow_datasets" not in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _import_tfds(name: str) -> Any:
    try:
        import tensorflow_datasets as tfds  # heavy, and absent from the GPU image: import on demand only
    except ImportError:
        raise DataError(
            f"unknown dataset {name!r}: not found locally, and TFDS is not installed "
            "(pip install tensorflow-datasets, or point BDJAX_DATA_ROOT / data_root at a local copy)"
        ) from None
    return tfds


def _keys(name: str, features: Any, supervised: Any) -> tuple[str, str]:
    """(image feature, label feature): the supervised keys, else 'image' and 'label'."""
    keys = supervised[:2] if isinstance(supervised, (tuple, list)) and len(supervised) >= 2 else None
    if keys is None or not all(isinstance(k, str) for k in keys):
        keys = ("image", "label")
    if not all(k in features for k in keys):
        raise DataError(f"TFDS {name!r} has features {sorted(features.keys())}, expected an image and a label "
                        "(supervised keys, or features named 'image' and 'label')")
    return keys[0], keys[1]


def _image_shape(name: str, key: str, feature: Any) -> tuple[int, int, int]:
    """The fixed (H, W, C) of a uint8 image feature; rank-2 features get C = 1."""
    shape, dtype = getattr(feature, "shape", None), getattr(feature, "np_dtype", None)
    what = f"TFDS {name!r} feature {key!r} is {type(feature).__name__}"
    if dtype is None or np.dtype(dtype) != np.uint8 or shape is None or len(shape) not in (2, 3):
        raise DataError(f"{what} of {np.dtype(dtype) if dtype is not None else '?'} shape {shape}, "
                        "expected uint8 images (H, W) or (H, W, C) (not an image dataset?)")
    if any(d is None for d in shape):
        raise DataError(f"{what} of shape {tuple(shape)}, expected images of one fixed size "
                        "(resize them to a fixed size and save them as a local .npz instead)")
    h, w, c = (*shape, 1) if len(shape) == 2 else shape
    if c not in (1, 3):
        raise DataError(f"{what} with {c} channels, expected 1 or 3")
    return int(h), int(w), int(c)


def _check_label(name: str, key: str, feature: Any) -> None:
    dtype, shape = getattr(feature, "np_dtype", None), getattr(feature, "shape", None)
    if dtype is None or not np.issubdtype(np.dtype(dtype), np.integer) or shape not in ((), None):
        raise DataError(f"TFDS {name!r} label feature {key!r} is {type(feature).__name__} of "
                        f"{np.dtype(dtype) if dtype is not None else '?'} shape {shape}, "
                        "expected one integer class per example")


def _read_split(name: str, split: str, source: Any, keys: tuple[str, str], shape: tuple[int, int, int],
                bar: Any) -> tuple[np.ndarray, np.ndarray]:
    """Stream one split of a random-access data source, CHUNK examples at a time, into preallocated arrays."""
    image_key, label_key = keys
    n = len(source)
    x, y = np.empty((n, *shape), np.uint8), np.empty(n, np.int64)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        examples = source.__getitems__(list(range(start, stop)))
        for i, ex in enumerate(examples, start):
            image = np.asarray(ex[image_key])
            if image.dtype != np.uint8 or image.shape not in (shape, shape[:2] if shape[2] == 1 else shape):
                raise DataError(f"TFDS {name!r} {split} example {i}: decoded a {image.dtype} image of shape "
                                f"{image.shape}, expected uint8 {shape}")
            x[i] = image.reshape(shape)
        y[start:stop] = [ex[label_key] for ex in examples]  # integer scalars: checked on the feature
        bar.update(stop - start)
    return x, y


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """Prepare (download, as array_record) if needed and read a TFDS image-classification dataset."""
    tfds = _import_tfds(name)
    from bdjax.train.loop import progress_enabled  # imported late: the trainer pulls in JAX and Flax

    show_progress = progress_enabled()
    if not show_progress:
        tfds.disable_progress_bar()  # TFDS's own download and preparation bars
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
        raise DataError(f"unknown dataset {name!r}: not found locally nor in the TFDS catalog "
                        f"({_one_line(e)})") from None
    features = builder.info.features
    # Checked before any download: a text or tabular dataset should not cost a multi-GB fetch to reject.
    keys = _keys(name, features, builder.info.supervised_keys)
    shape = _image_shape(name, keys[0], features[keys[0]])
    _check_label(name, keys[1], features[keys[1]])
    try:
        builder.download_and_prepare(file_format="array_record")  # a no-op when already prepared
    except Exception as e:
        if _needs_tensorflow(e):
            raise DataError(f"preparing TFDS dataset {name!r} needs TensorFlow (its builder calls it); "
                            "pip install tensorflow once to prepare it, or use a local copy under "
                            "BDJAX_DATA_ROOT") from None
        raise DataError(f"could not load TFDS dataset {name!r} ({_one_line(e)}); "
                        "use a local copy under BDJAX_DATA_ROOT instead") from None
    info = builder.info
    splits = set(info.splits.keys())
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or test_split is None:
        raise DataError(f"TFDS dataset {name!r} has splits {sorted(splits)}, expected train and test (or validation)")
    try:
        sources = builder.as_data_source(split=["train", test_split])
    except (NotImplementedError, ValueError):  # no random-access files: tfrecord, read only through tf.data
        fmt = getattr(info.file_format, "value", info.file_format)
        raise DataError(f"TFDS dataset {name!r} at {builder.data_dir} is stored as {fmt}, which needs "
                        "TensorFlow to read; bdjax reads array_record: delete that folder to prepare it again, "
                        "or use another data_dir (data.tfds_dir)") from None
    total = sum(len(s) for s in sources)
    with tqdm(total=total, desc=f"TFDS {name}", unit="img", disable=not show_progress,
              mininterval=2.0, dynamic_ncols=True) as bar:
        x_train, y_train = _read_split(name, "train", sources[0], keys, shape, bar)
        x_test, y_test = _read_split(name, test_split, sources[1], keys, shape, bar)

    label = features[keys[1]]
    if isinstance(label, tfds.features.ClassLabel):
        names = tuple(str(c) for c in label.names)
    else:  # an integer label without class names: "0".."K-1"
        top = max(int(y_train.max(initial=0)), int(y_test.max(initial=0)))
        names = tuple(str(i) for i in range(top + 1))
    ds = Dataset(name, x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32), names)
    validate_dataset(ds)
    return ds

