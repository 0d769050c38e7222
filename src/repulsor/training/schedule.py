"""The optimisation maths of training: the learning-rate schedule, the optimiser and its
parameter groups, and the lookahead slow weights.

``lr_at`` gives the rate at any point of training (a float number of epochs), so a resumed
run sets exactly the rates an uninterrupted one would; ``set_lr`` applies it to every
parameter group at that group's ``lr_scale``.
"""

from __future__ import annotations

import math

import torch


def lr_at(cfg, progress: float) -> float:
    """The learning rate at ``progress`` = epochs done as a float (e.g. 2.5 = half-way through epoch 3).

    cyclic: triangular (Smith 2017) in the single-cycle form of Wong et al.: ``lr_min`` up to
    ``lr`` over the first ``warmup`` fraction of training (40% by default), back down to
    ``lr_min`` at the end.
    onecycle: linear warm-up over 30% of training, then cosine annealing to zero.
    multistep: ``lr`` times ``gamma`` for every milestone epoch passed.
    """
    t = cfg.train
    frac = progress / t.epochs
    if t.schedule == "cyclic":
        peak = t.warmup
        rise = frac / peak if frac < peak else (1 - frac) / (1 - peak) if peak < 1 else 1.0
        return t.lr_min + (t.lr - t.lr_min) * max(0.0, min(1.0, rise))
    if t.schedule == "onecycle":
        warm = 0.3
        if frac < warm:
            return t.lr * frac / warm
        return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm))))
    if t.schedule == "multistep":
        return t.lr * t.gamma ** sum(progress >= m for m in t.milestones)
    return t.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's rate to ``lr`` times the group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """SGD (or, with ``optimizer = "adam"``, AdamW with beta1 = ``momentum`` and decoupled weight
    decay); biases (1-d ``*.bias``) in their own group at ``bias_lr_scale`` times the rate and
    weight decay divided by it. Frozen parameters are left out. Each group's ``lr_scale`` is
    applied by the schedule."""
    biases, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_bias = t.bias_lr_scale != 1.0 and p.dim() == 1 and name.endswith("bias")
            (biases if is_bias else others).append(p)
    groups = [{"params": others, "lr_scale": 1.0, "weight_decay": t.weight_decay}]
    if biases:
        groups.append({"params": biases, "lr_scale": t.bias_lr_scale, "weight_decay": t.weight_decay / t.bias_lr_scale})
    if getattr(t, "optimizer", "sgd") == "adam":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.momentum, 0.999))
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)


class Lookahead:
    """Slow weights that the trained weights are pulled to every ``every`` steps (Zhang et al.'s
    lookahead, in the form of the fast CIFAR recipes): ``slow = d * slow + (1 - d) * fast`` and
    then ``fast = slow``, with ``d = decay ** every * progress ** 3``, so the average starts from
    the fast weights and weighs history more as training ends. Floating-point buffers (batch-norm
    statistics) are averaged with the parameters. The slow weights are part of the checkpoint,
    so a resumed run takes exactly the same steps.
    """

    PREFIX = "lookahead."

    def __init__(self, model: torch.nn.Module, every: int, decay: float):
        self.every, self.decay = every, decay
        self.slow = {name: t.detach().clone() for name, t in self._tensors(model)}

    @staticmethod
    def _tensors(model):
        return [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]

    @torch.no_grad()
    def step(self, model: torch.nn.Module, step: int, progress: float) -> None:
        """After optimiser step number ``step`` (1-based, counted over the whole run)."""
        if step % self.every:
            return
        self.pull(model, self.decay ** self.every * progress ** 3)

    def after(self, model: torch.nn.Module, done: int, total: int) -> None:
        """After optimiser step ``done`` of the run's ``total``: ``step`` until the last one,
        which leaves the slow weights in the model, as the recipe does."""
        if done < total:
            self.step(model, done, done / total)
        else:
            self.pull(model, 1.0)

    @torch.no_grad()
    def pull(self, model: torch.nn.Module, decay: float) -> None:
        for name, fast in self._tensors(model):
            slow = self.slow[name]
            slow.mul_(decay).add_(fast.to(slow.dtype), alpha=1 - decay)
            fast.copy_(slow)

    def state(self) -> dict[str, torch.Tensor]:
        return {self.PREFIX + name: t for name, t in self.slow.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.slow:
            self.slow[name].copy_(tensors[self.PREFIX + name])
