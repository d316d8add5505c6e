"""Write a dataset, or a seeded random subset of it, as one compressed .npz that bdjax reads by path
(`dataset=FILE.npz`): a small copy to carry to a machine that has no dataset folder and no network (a GPU node).

    python scripts/pack_dataset.py cifar10 --out cifar10_small.npz --n-train 10000 --seed 0

The subset is `Dataset.subset(n_train, n_test, seed)`: with --n-train 10000 --seed 0 and the test split whole it
holds the same 10000 CIFAR-10 training images that the SSL experiment's small preset (n_train=10000, seed 0)
pretrains on, so `experiments/ssl_backdoor_cifar10.py --scale small dataset=cifar10_small.npz` trains on what
`dataset=cifar10` would (55 MiB compressed, the test split included).
"""
from __future__ import annotations

import argparse
import sys

from bdjax.data import load_dataset
from bdjax.data.npz import write_npz
from bdjax.errors import BdjaxError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="a bdjax dataset name (cifar10, mnist, digits, a folder or .npz path)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--n-train", type=int, default=None, help="training images to keep (default: all)")
    p.add_argument("--n-test", type=int, default=None, help="test images to keep (default: all)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not a.out.endswith(".npz"):
        p.error(f"--out must name a .npz file, got {a.out!r}")
    try:
        ds = load_dataset(a.dataset).subset(a.n_train, a.n_test, a.seed)
    except BdjaxError as e:
        print(f"pack_dataset: error: {e}", file=sys.stderr)
        return 2
    write_npz(a.out, ds, compress=True)
    print(f"{a.out}: {len(ds.x_train)} training and {len(ds.x_test)} test images of {ds.name} "
          f"({ds.num_classes} classes, {ds.image_shape})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
