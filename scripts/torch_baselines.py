"""Plain PyTorch training loops used by the benchmark scripts as same-run baselines (optional `bench` extra).

Nothing in bdjax or its tests imports this file: it exists so a benchmark can print bdjax's rate as a ratio
against the way a researcher would train the same network in PyTorch today (one model after another, on all
cores), measured in the same process on the same machine.
"""
from __future__ import annotations

import os
import time


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:  # ImportError, or a CUDA wheel whose libraries are missing
        return False
    return True


def ulp_cnn(num_classes: int = 10, width: int = 64, fc_width: int = 384, dropout: float = 0.2):
    """The ULP CIFAR-10 CNN in PyTorch (the same layers as bdjax.models.ulp_cnn.UlpCNN)."""
    import torch.nn as nn

    layers, c_in = [], 3
    for i in range(1, 7):
        layers += [nn.Conv2d(c_in, width, 5, padding=2), nn.BatchNorm2d(width), nn.ReLU()]
        c_in = width
        if i % 2 == 0:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.Flatten(), nn.Linear(width * 4 * 4, fc_width), nn.BatchNorm1d(fc_width), nn.ReLU(),
               nn.Dropout(dropout), nn.Linear(fc_width, fc_width // 2), nn.BatchNorm1d(fc_width // 2), nn.ReLU(),
               nn.Dropout(dropout), nn.Linear(fc_width // 2, num_classes)]
    return nn.Sequential(*layers)


def ulp_cnn_images_per_s(batch: int = 64, steps: int = 3, lr: float = 1e-2, threads: int | None = None) -> float:
    """Train-step throughput of one ULP CNN (Adam, cross-entropy, 32x32x3 random images), all cores: the rate of
    a zoo trained one model after another in PyTorch."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    model = ulp_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()  # waits for the step, as a training loop that logs the loss does

    for _ in range(2):  # warm-up (allocator, oneDNN primitive caches)
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)
