"""Datasets as NHWC uint8 numpy arrays: embedded digits, local IDX / image-folder / .npz copies, or TFDS."""

from bdjax.data.dataset import Dataset, validate_dataset
from bdjax.data.registry import default_data_root, load_dataset

__all__ = ["Dataset", "default_data_root", "load_dataset", "validate_dataset"]
