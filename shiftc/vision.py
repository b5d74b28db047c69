"""A small image classifier trained here: a ResNet-style net on Fashion-MNIST.

``shiftc export shiftc.vision:fashion_resnet -o cnn.onnx`` builds it, trains it on the 60,000
training images (``SHIFTC_FASHION_STEPS`` steps of 128, default :data:`DEFAULT_STEPS`: 4.3
epochs, a few minutes on 2 cores; the weights are kept in shiftc's cache folder, so a second
export is immediate) and exports it as an image classifier: ``pixel_values [batch, 1, 28, 28]``
(normalised as :func:`shiftc.frontend.data.fashion_mnist_inputs` does) → ``logits [batch, 10]``.
``shiftc eval cnn.onnx|cnn.so --task top1`` scores it on the 10,000 test images.

The net: a 3×3 stem of 24 channels, two basic residual blocks (32 and 64 channels, each halving
the resolution, a 1×1 convolution on the shortcut), global average pooling and a linear layer:
0.07 M parameters, 6.3 M multiply-adds per image. Training: SGD with Nesterov
momentum 0.9, weight decay 5e-4, a one-cycle learning rate peaking at 0.2, batch 128, random
horizontal flips and 2-pixel shifts; seeded, so the same steps give the same weights.
"""

from __future__ import annotations

import os
import time

import numpy as np

DEFAULT_STEPS = 2000
STEPS_ENV = "SHIFTC_FASHION_STEPS"


def _net():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    return nn.Sequential(
        nn.Conv2d(1, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        Block(24, 32, 2), Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train(model, steps: int, *, batch: int = 128, peak_lr: float = 0.2, seed: int = 0, log_every: int = 100) -> dict:
    """Train ``model`` in place on the Fashion-MNIST training set for ``steps`` steps."""
    import torch

    from .frontend.data import fashion_mnist_batches
    from .progress import log

    batches = fashion_mnist_batches(np.random.default_rng(seed), batch)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak_lr, total_steps=steps, pct_start=0.25)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        xb, yb = next(batches)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"  fashion-mnist step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f}")
    model.eval()
    return {"steps": steps, "batch": batch, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": float(np.mean(losses[-min(50, len(losses)):]))}


def trained_resnet(steps: int | None = None, *, seed: int = 0):
    """The net trained for ``steps`` (default ``$SHIFTC_FASHION_STEPS`` or DEFAULT_STEPS), from the
    cache when these weights were trained before."""
    import torch

    from .frontend.onnx_io import atomic_output
    from .paths import cache_dir
    from .progress import step as progress_step

    steps = int(steps or os.environ.get(STEPS_ENV) or DEFAULT_STEPS)
    torch.manual_seed(seed)
    model = _net()
    path = cache_dir("fashion", f"resnet-{steps}steps-seed{seed}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    with progress_step(f"training the Fashion-MNIST ResNet ({steps} steps of 128 images)"):
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        try:
            train(model, steps, seed=seed)
        finally:
            torch.set_num_threads(threads)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model


def fashion_resnet():
    """``module:factory`` for ``shiftc export``: the trained net as an image classifier."""
    import torch

    return {"model": trained_resnet(), "inputs": (torch.zeros(1, 1, 28, 28),), "input_names": ["pixel_values"],
            "output_names": ["logits"], "dynamic_axes": {"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            "task": "image-classification"}


def parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))
