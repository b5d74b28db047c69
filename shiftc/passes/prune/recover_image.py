"""Recovery of a pruned image classifier by training (``--prune R --recover-steps S``).

Structured pruning removes channels; what makes it worth doing is that the smaller network
recovers its accuracy by training (Liu et al. 2019, "Rethinking the Value of Network Pruning",
ICLR: the pruned architecture trained — fine-tuned from the kept weights or trained from scratch —
is what matters). The pruned ONNX graph is trained directly (:class:`~shiftc.passes.onnx_torch.
OnnxModule`: its initializers as torch parameters), on the Fashion-MNIST training set (grey 28 × 28
classifiers), with knowledge distillation from the unpruned graph:

    loss = (1 − a) · CE(student, label) + a · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

(a = 0.5, T = 4; Hinton et al. 2015). The exported graph has its batch norms folded into the
convolutions, so the optimiser is AdamW (weight decay 1e-4; plain SGD at the rates a batch-normed
net takes diverges here), with a one-cycle learning rate peaking at 1e-3 for a fine-tune
(``--recover-init finetune``, the kept weights) or 3e-3 from scratch (``--recover-init scratch``:
every trained tensor re-drawn, He-normal weights and zero biases — the paper's comparison at an
equal budget); batches of 128 with flips and 2-pixel shifts; seeded. ``--recover-steps`` and/or
``--recover-minutes`` bound it (first reached ends it).

With ``--nm N:M`` the training also moves the net into that pattern gradually (mask decay, the
MDGF schedule of Progressive Gradient Flow, Bambhaniya et al. 2024): the mask is re-chosen by
magnitude every step and the weights outside it are scaled by a factor that decays linearly from 1
to 0 over the first 75% of the steps, so they keep receiving gradient (and may win their place
back) while they fade; the rest of the steps train the hard-masked net. ``nm.apply_nm`` then
records the pattern (the zeros are already there).
"""

from __future__ import annotations

import math
import time

import numpy as np

from ...errors import UsageError
from ...frontend.data import FASHION_MNIST_SHAPE
from ...progress import log, step

KD_WEIGHT, KD_TEMPERATURE = 0.5, 4.0
PEAK_LR = {"finetune": 1e-3, "scratch": 3e-3}
BATCH = 128
DECAY_END = 0.75  # N:M mask decay: the pruned weights' factor reaches 0 at this fraction of the steps


def check_classifier(model, model_path: str) -> None:
    """Recovery data exists for grey 28 x 28 classifiers (Fashion-MNIST); refuse others by shape."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    dims = [d.dim_value or d.dim_param for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
    if len(dims) != 4 or tuple(dims[1:]) != FASHION_MNIST_SHAPE:
        raise UsageError(f"--recover-steps/--recover-minutes on an image classifier: training data exists for "
                         f"grey 28 x 28 inputs (Fashion-MNIST); '{model_path}' takes {dims or len(inputs)}")


def _reinit(module) -> None:
    import torch

    with torch.no_grad():
        for p in module.params:
            if p.dim() >= 2:
                torch.nn.init.kaiming_normal_(p, nonlinearity="relu")
            else:
                p.zero_()


def _nm_mask(w, axis: int, n: int, m: int):
    """nm.weight_mask of a torch weight by magnitude (the same blocks and ties as apply_nm)."""
    import torch

    from .nm import weight_mask

    return torch.from_numpy(weight_mask(w.detach().abs().numpy(), axis, n, m)).to(w.dtype)


def gradual_nm(module, model, pattern: str, total: int, decay_end: float = DECAY_END):
    """Mask-decay N:M training (Progressive Gradient Flow's MDGF): every step the N:M mask is
    re-chosen by magnitude and the weights outside it are scaled by β(t) = max(0, 1 − t / (decay_end
    · total)) instead of being cut, so gradients keep flowing to them while β decays; the last
    (1 − decay_end) of the steps train the hard-masked net. Returns ``step(t)`` to call before each
    step and ``finish()`` that zeroes the masked weights for good."""
    import torch

    from .groups import GraphInfo
    from .nm import nm_layers, parse_pattern

    n, m = parse_pattern(pattern)
    layers = {w: axis for w, axis in nm_layers(GraphInfo(model), m).items() if w in module.names}
    beta = [1.0]

    def fn_for(axis):
        def f(w):
            mask = _nm_mask(w, axis, n, m)
            return w * (mask + (1.0 - mask) * beta[0])
        return f

    module.weight_fns.update({name: fn_for(axis) for name, axis in layers.items()})

    def step_to(t: int) -> None:
        beta[0] = max(0.0, 1.0 - t / max(1.0, decay_end * total))

    def finish() -> None:
        with torch.no_grad():
            for name, axis in layers.items():
                p = module.params[module.names[name]]
                p.mul_(_nm_mask(p, axis, n, m))
        for name in layers:
            module.weight_fns.pop(name)

    return step_to, finish, sorted(layers)


def recover_classifier(pruned, teacher, *, steps: int | None, minutes: float | None, init: str = "finetune",
                       seed: int = 0, nm: str | None = None):
    """(trained copy of ``pruned``, log): distilled from ``teacher`` on Fashion-MNIST's training set;
    with ``nm`` ("2:4"), trained into that N:M pattern gradually (:func:`gradual_nm`)."""
    import torch

    from ...frontend.data import fashion_mnist_batches
    from ..onnx_torch import OnnxModule

    student, ref = OnnxModule(pruned), OnnxModule(teacher)
    torch.manual_seed(seed)
    if init == "scratch":
        _reinit(student)
    batches = fashion_mnist_batches(np.random.default_rng(seed), BATCH)
    total = steps or max(1, int((minutes or 1) * 60 / 0.3))  # the schedule's length; minutes may end it sooner
    opt = torch.optim.AdamW(student.parameters(), lr=PEAK_LR[init], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PEAK_LR[init], total_steps=total, pct_start=0.25)
    step_to, finish, nm_layers = gradual_nm(student, pruned, nm, total) if nm else (None, None, [])
    losses, t0 = [], time.perf_counter()
    what = f"{init}{f', {nm} by mask decay' if nm else ''}"
    with step(f"recovery training ({what}, {total} steps of {BATCH} Fashion-MNIST images, distilled)"):
        for i in range(total):
            if minutes is not None and time.perf_counter() - t0 > minutes * 60:
                break
            if step_to:
                step_to(i)
            xn, yn = next(batches)
            xb = torch.from_numpy(xn)
            with torch.no_grad():
                soft = torch.softmax(ref(xb) / KD_TEMPERATURE, -1)
            logits = student(xb)
            kd = torch.nn.functional.kl_div(torch.log_softmax(logits / KD_TEMPERATURE, -1), soft, reduction="batchmean")
            ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(yn))
            loss = (1 - KD_WEIGHT) * ce + KD_WEIGHT * KD_TEMPERATURE ** 2 * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if (i + 1) % 100 == 0:
                log(f"  recovery step {i + 1}/{total}: loss {np.mean(losses[-100:]):.4f}")
    done = len(losses)
    if finish:
        finish()
    return student.write_back(), {"init": init, "steps": done, "seconds": round(time.perf_counter() - t0, 1),
                                  **({"nm": nm, "nm_layers": len(nm_layers), "nm_decay_end": DECAY_END} if nm else {}),
                                  "final_loss": float(np.mean(losses[-min(50, done):])) if done else math.nan,
                                  "kd_weight": KD_WEIGHT, "kd_temperature": KD_TEMPERATURE, "peak_lr": PEAK_LR[init]}
