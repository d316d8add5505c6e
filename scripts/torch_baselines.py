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


def torch_device_for(jax_platform: str) -> str | None:
    """The torch device on which a baseline is like-for-like with JAX's default platform ("cpu" or "cuda"), or
    None when torch is missing or cannot use that device (e.g. a CPU-only torch beside JAX on a GPU)."""
    if not torch_available():
        return None
    if jax_platform == "cpu":
        return "cpu"
    import torch
    return "cuda" if jax_platform == "gpu" and torch.cuda.is_available() else None


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


def cifar_resnet(widths=(64, 128, 256, 512), stage_sizes=(2, 2, 2, 2)):
    """The CIFAR ResNet-18 layout of bdjax.models.resnet.ResNet18 (3x3 stem, BasicBlocks), without its classifier:
    returns the pooled penultimate features."""
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                                      nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(c_out))
            self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                          if stride != 1 or c_in != c_out else nn.Identity())

        def forward(self, x):
            return (self.body(x) + self.short(x)).relu()

    layers, c = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)], widths[0]
    for s, (n, w) in enumerate(zip(stage_sizes, widths)):
        for b in range(n):
            layers.append(Block(c, w, 2 if s > 0 and b == 0 else 1))
            c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c


def moco_images_per_s(widths=(64, 128, 256, 512), stage_sizes=(2, 2, 2, 2), batch: int = 128, steps: int = 3,
                      queue_size: int = 2048, dim: int = 128, hidden: int = 2048, threads: int | None = None,
                      device: str = "cpu") -> float:
    """A MoCo v2 step in plain PyTorch (query forward/backward, momentum key encoder, queue, InfoNCE; SGD), on two
    already-augmented random views: the augmentation is NOT included (bdjax's step includes it). device: "cpu"
    (all cores) or "cuda" (the step's loss.item() synchronises, as a training loop that logs the loss does)."""
    import copy

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    backbone, feat = cifar_resnet(widths, stage_sizes)
    q_enc = nn.Sequential(backbone, nn.Linear(feat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)).to(device)
    k_enc = copy.deepcopy(q_enc)
    for p in k_enc.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(q_enc.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    queue = F.normalize(torch.randn(queue_size, dim, device=device), dim=1)
    x1, x2 = torch.rand(batch, 3, 32, 32, device=device), torch.rand(batch, 3, 32, 32, device=device)
    ptr = [0]

    def step():
        nonlocal queue
        with torch.no_grad():
            for pk, pq in zip(k_enc.parameters(), q_enc.parameters()):
                pk.mul_(0.99).add_(pq.detach(), alpha=0.01)
            k = F.normalize(k_enc(x2), dim=1)
        q = F.normalize(q_enc(x1), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.2
        loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        queue[ptr[0]:ptr[0] + batch] = k
        ptr[0] = (ptr[0] + batch) % queue_size
        return loss.item()

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)
