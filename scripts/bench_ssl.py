"""Pretraining throughput of bdjax.ssl (MoCo v2, BYOL) and the share of the step spent in augmentation.

    python scripts/bench_ssl.py [--steps 4] [--batch 128] [--backbones small,resnet18] [--methods moco,byol]
                                [--byol-bn-groups 1,0]

For each method and backbone (small: the narrow ResNet-18 of `--scale small`, widths 16-128, one block per stage;
resnet18: the full CIFAR ResNet-18) on 32x32 images: images/s of the compiled pretraining step (data-parallel over
every local device, as `pretrain` runs it) and augment_share = time of the two-view augmentation alone (compiled
the same way) / time of the whole step. The goal is augment_share < 0.15. With torch importable, MoCo v2's step
in plain PyTorch (scripts/torch_baselines.py, same backbone and head, on pre-augmented views: torch's side does
NOT augment) in the same run, on the same device (CPU cores, or CUDA when JAX runs on a GPU): ratio_vs_torch =
bdjax images/s / PyTorch images/s. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import bdjax  # noqa: F401  (one CPU device per core before JAX starts)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bdjax.models import get_model
from bdjax.ssl import byol, moco
from bdjax.ssl import pretraining as P
from bdjax.ssl.augment import AugmentConfig, two_views
from bdjax.train import core
from bdjax.train.sharding import batch_sharded, data_mesh, replicated

BACKBONES = {"small": dict(widths=(16, 32, 64, 128), stage_sizes=(1, 1, 1, 1)), "resnet18": {}}


def timed(f, *args, steps: int) -> float:
    out = f(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(steps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps


def bench(method: str, backbone: str, batch: int, steps: int, byol_bn_groups: int = 1) -> dict:
    mesh = data_mesh(batch)
    mesh = mesh if mesh.size > 1 else None
    cfg = (moco.MocoConfig(queue_size=16 * batch, bn_groups=0) if method == "moco"
           else byol.ByolConfig(bn_groups=byol_bn_groups))
    m = P.build(method, get_model("resnet18", 10, **BACKBONES[backbone]), cfg, batch_size=batch,
                total_steps=1000, n_devices=mesh.size if mesh else 1)
    tx = optax.sgd(0.01, 0.9)
    n = 4 * batch
    x = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    place = replicated(mesh) if mesh else jax.devices()[0]
    state = jax.device_put(jax.jit(lambda k: P.init_state(m, tx, k, (32, 32, 3)))(jax.random.key(0)), place)
    task, data, perm = jax.device_put((core.RunTask(jnp.int32(0)), (x,), jnp.arange(n)), place)
    step = P.make_step(m, tx, batch_size=batch, steps_per_epoch=n // batch, mesh=mesh)
    state, _ = step(state, task, perm, data)  # compile
    holder = [state]

    def run_step():
        holder[0], metrics = step(holder[0], task, perm, data)
        return metrics["loss"]
    t_step = timed(run_step, steps=steps)

    sharded = batch_sharded(mesh) if mesh else None

    @jax.jit
    def aug(key, x):
        x = core.to_float(x)
        x = lax.with_sharding_constraint(x, sharded) if sharded is not None else x
        return two_views(key, x, AugmentConfig())
    xb = jax.device_put(x[:batch], place)
    t_aug = timed(aug, jax.random.key(1), xb, steps=steps)
    return {"images_per_s": batch / t_step, "step_s": t_step, "augment_s": t_aug, "augment_share": t_aug / t_step}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="moco,byol")
    p.add_argument("--backbones", default="small,resnet18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--byol-bn-groups", default="1",
                   help="BYOL's BN groups, comma-separated (1 = synchronised over the batch, 0 = one per device); "
                        "with several, byol_bn_speedup = images/s of each against the first, in this run")
    a = p.parse_args()
    results = {}
    groups = [int(g) for g in a.byol_bn_groups.split(",")]
    for method in a.methods.split(","):
        for bb in a.backbones.split(","):
            for g in (groups if method == "byol" else [None]):
                name = f"{method}/{bb}" if g in (None, groups[0]) else f"{method}[bn_groups={g}]/{bb}"
                r = bench(method, bb, a.batch, a.steps, g if g is not None else 1)
                results[name] = r
                print(name, {k: round(v, 3) for k, v in r.items()}, flush=True)
    out = {"device": f"{jax.devices()[0].platform}:{len(jax.devices())}", "batch": a.batch,
           "byol_bn_groups": groups,
           "images_per_s": {k: r["images_per_s"] for k, r in results.items()},
           "augment_share": {k: r["augment_share"] for k, r in results.items()}}
    if len(groups) > 1 and "byol" in a.methods.split(","):
        out["byol_bn_speedup"] = {f"bn_groups={g}/{bb}": results[f"byol[bn_groups={g}]/{bb}"]["images_per_s"]
                                  / results[f"byol/{bb}"]["images_per_s"]
                                  for g in groups[1:] for bb in a.backbones.split(",")}
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from torch_baselines import moco_images_per_s, torch_device_for
    torch_device = torch_device_for(jax.devices()[0].platform)
    if torch_device is not None and "moco" in a.methods.split(","):
        torch_rate = {}
        out["torch_device"] = torch_device
        for bb in a.backbones.split(","):
            kw = BACKBONES[bb]
            torch_rate[f"moco/{bb}"] = moco_images_per_s(batch=a.batch, steps=a.steps, queue_size=16 * a.batch,
                                                         device=torch_device, **kw)
            print("torch moco", bb, round(torch_rate[f"moco/{bb}"], 3), flush=True)
        out["torch_images_per_s"] = torch_rate
        out["ratio_vs_torch"] = {k: out["images_per_s"][k] / v for k, v in torch_rate.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
