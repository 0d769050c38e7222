"""The checkpoint: everything a resumed run needs to take exactly the steps an uninterrupted run would.

A checkpoint file (``LAST`` after every epoch, ``BEST`` at the best validation, see
``store.layout``) holds the model's and the optimiser's tensors and the lookahead slow weights;
its metadata holds the config, the ``State`` (epoch, step inside it, running sums, model
selection), the optimiser's settings and the gradient scaler's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, to_dict
from ..store import files as ckpt
from .schedule import Lookahead


@dataclass
class State:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    epoch: int = 0  # epoch in progress (0-based)
    step: int = 0  # steps of that epoch already taken
    sums: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0.0, "seen": 0.0})
    best_metric: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    peak_robust: float = -1.0
    elapsed: float = 0.0  # training seconds before this process started
    passes: dict = field(default_factory=lambda: {"forward": 0.0, "backward": 0.0, "examples": 0.0})
    finished: bool = False
    stopped: str | None = None  # why training ended before its last epoch
    overfitted: bool = False  # fgsm_rs: catastrophic overfitting was detected


def save_checkpoint(path: Path, model, optimizer, scaler, state: State, cfg: Config,
                    lookahead: Lookahead | None = None) -> None:
    tensors = ckpt.model_state(model)
    opt_tensors, opt_meta = ckpt.optimizer_state(optimizer)
    tensors.update(opt_tensors)
    if lookahead is not None:
        tensors.update(lookahead.state())
    meta = {
        "config": to_dict(cfg),
        "state": state.__dict__,
        "optimizer": opt_meta,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    ckpt.save_tensors(path, tensors, meta)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler,
                    lookahead: Lookahead | None) -> State:
    """Load the checkpoint at ``path`` into the model, optimiser, lookahead and scaler; return its ``State``."""
    tensors, meta = ckpt.load_tensors(path)
    ckpt.load_model_state(model, tensors, path)
    ckpt.load_optimizer_state(optimizer, tensors, meta["optimizer"])
    if lookahead is not None:
        lookahead.load(tensors)
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return State(**meta["state"])
