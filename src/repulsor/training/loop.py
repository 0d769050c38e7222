"""The one training loop, for every method.

Determinism by construction: the data order and the augmentation of epoch ``e`` come from
generators seeded by (seed, e), and the random start of a training-time attack at step
``s`` from (seed, e, s). A checkpoint records the epoch, the step inside the epoch and the
running sums, so a resumed run replays exactly the steps an uninterrupted run would take:
on the CPU in fp32 its weights and metrics are bitwise identical (tests/test_resume.py).

Run directory layout: see docs/design.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..store import files as ckpt
from ..store import run as store
from ..attacks import evaluating, pgd
from ..config import Config, load_config, resolve_paths, to_dict, to_toml
from ..data import DATASETS, augment, default_augmentation, load_dataset
from ..errors import Interrupted, UserError
from .methods import METHODS, Method, TrainContext, mmc_centres
from ..models import build_for_method, fit_to_data
from ..prototypes import check_prototypes, generate_prototypes, load_prototypes, save_prototypes
from ..store.run import BEST, LAST, MODEL
from ..runtime import (ProcessGroup, autocast, cpu_has_native_bf16, derive_seed, generator, init_process_group,
    precision_name, resolve_device, resolve_precision)



class TrainingStopped(UserError):
    """Training stopped early for a reason the user must hear about (NaN loss, overfitting)."""


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


def resolve_prototypes(cfg: Config, method: Method, num_classes: int) -> torch.Tensor | None:
    """The fixed prototypes of a prototype method, or None for a linear head."""
    if not method.uses_prototypes:
        return None
    p = cfg.prototypes
    if method.prototypes == "mmc":
        return mmc_centres(num_classes, p.dim)
    if p.file:
        prototypes, _ = load_prototypes(p.file)
        check_prototypes(prototypes, num_classes, p.dim, p.file)
        return prototypes
    metric = "cosine" if method.distance == "cosine" else p.metric
    return generate_prototypes(num_classes, p.dim, metric=metric, epochs=p.epochs, lr=p.lr, seed=p.seed)


def run_status(out: Path) -> str:
    """``empty`` (no run), ``unfinished`` (a config, no final weights) or ``finished``."""
    out = Path(out)
    if (out / MODEL).exists():
        return "finished"
    if (out / "config.toml").is_file() or (out / LAST).exists():
        return "unfinished"
    return "empty"


def _check_run_dir(out: Path, resume: bool) -> None:
    """Refuse an unusable run folder before any work is done and before anything is written."""
    if resume:
        if not out.is_dir():
            what = "it is a file, not a folder" if out.exists() else "the folder does not exist"
            raise UserError(f"cannot resume {out}: {what}; give a run folder written by repulsor train --out")
        if not (out / "config.toml").is_file():
            raise UserError(f"cannot resume {out}: it holds no run (no config.toml); start one with --out {out}")
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot create run folder {out}: a file of that name exists; choose another --out")
    status = run_status(out)
    if status == "finished":
        raise UserError(f"{out} already holds a run (finished); evaluate it with: repulsor evaluate {out}, or choose"
                        " another --out")
    if status == "unfinished" and (out / LAST).exists():
        raise UserError(f"{out} already holds a run (unfinished); continue it with: repulsor train --resume {out},"
                        " or choose another --out")
    parent = out.parent  # the nearest existing ancestor must be a folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create run folder {out}: {parent} is a file, not a folder; choose another --out")


def _prepare_run_dir(out: Path, cfg: Config, resume: bool, group: ProcessGroup) -> None:
    _check_run_dir(out, resume)
    if resume:
        return
    if group.is_main:
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create run folder {out}: {error.strerror}; choose another --out") from None
        try:
            ckpt.atomic_write_text(out / "config.toml", to_toml(cfg))
        except UserError:
            if created:  # leave nothing behind (an empty folder we made)
                try:
                    out.rmdir()
                except OSError:
                    pass
            raise


def _load_data(cfg: Config):
    d = cfg.data
    kwargs = dict(data_dir=d.data_dir or None, val_size=d.val_size or None, split_seed=d.split_seed)
    x_train, y_train = load_dataset(d.name, "train", **kwargs)
    x_val, y_val = load_dataset(d.name, "val", **kwargs)
    if d.train_subset:
        x_train, y_train = x_train[: d.train_subset], y_train[: d.train_subset]
    return x_train, y_train, x_val, y_val


def _augmentation(cfg: Config) -> dict:
    if cfg.data.augment == "none":
        return {"crop_padding": 0, "flip": False}
    if cfg.data.augment == "crop_flip":
        return {"crop_padding": cfg.data.crop_padding, "flip": True}
    aug = default_augmentation(cfg.data.name)
    return {**aug, "crop_padding": cfg.data.crop_padding} if aug["crop_padding"] else aug


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """SGD; biases (1-d ``*.bias``) in their own group at ``bias_lr_scale`` times the rate and
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


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def validate(model, x_val, y_val, cfg: Config, device, batch_size: int = 500) -> dict:
    """Clean and PGD accuracy on the validation split, in fp32, the model in eval mode.

    The attack is PGD-``val_attack_steps`` at the training threat model, step
    2.5 * eps / steps, with the CW margin loss, so that model selection (early stopping)
    is made against the decision rule on held-out training data, never on the test split.
    """
    t = cfg.train
    correct = robust = 0
    with evaluating(model):
        for start in range(0, len(x_val), batch_size):
            x = x_val[start : start + batch_size].to(device)
            y = y_val[start : start + batch_size].to(device)
            with torch.no_grad():
                correct += (model(x).argmax(1) == y).sum().item()
            if t.eps > 0:
                x_adv = pgd(model, x, y, eps=t.eps, alpha=2.5 * t.eps / t.val_attack_steps,
                            steps=t.val_attack_steps, norm=t.norm, loss="cw", seed=derive_seed(t.seed, "val", start))
                with torch.no_grad():
                    robust += (model(x_adv).argmax(1) == y).sum().item()
    n = max(1, len(x_val))
    return {"val_clean": correct / n, "val_robust": robust / n if t.eps > 0 else None}


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint is saved first."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _save_checkpoint(path: Path, model, optimizer, scaler, state: State, cfg: Config,
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


def _append(path: Path, text: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}; free some space or choose another folder") from None


def _log(out: Path, text: str, group: ProcessGroup) -> None:
    if group.is_main:
        _append(out / "log.txt", text)


def _rewrite_metrics(out: Path, keep_epochs: int) -> None:
    """Drop metric lines of epochs that the checkpoint does not cover (written before a crash)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["epoch"] <= keep_epochs]
    ckpt.atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _tensorboard_writer(out: Path, enabled: bool, group: ProcessGroup):
    """A TensorBoard SummaryWriter in ``RUN/tensorboard`` (rank 0 only), or None."""
    if not enabled or not group.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def train(cfg: Config, out: str | Path, *, resume: bool = False, quiet: bool = False,
          tensorboard: bool = False) -> Path:
    """Train ``cfg.train.method`` on ``cfg.data`` and write a run directory at ``out``.

    Args:
        cfg: a validated ``Config``.
        out: the run directory (created; must not already hold a run unless ``resume``).
        resume: continue the run in ``out`` from its last checkpoint; ``cfg`` is then
            ignored in favour of the run's saved config.
        quiet: no progress bar.
        tensorboard: also write the per-epoch metrics as TensorBoard scalars to ``RUN/tensorboard``.

    Returns:
        The run directory. It holds ``model.safetensors`` (the selected weights, with the
        run's fingerprint), ``metrics.jsonl`` and, when ``eval.after_train``, ``results.json``.

    The run folder is locked while this process writes it (``store.locked``): a second
    ``train`` (or ``evaluate``) into it is refused with one line; a lock left by a killed
    process is taken over.
    """
    out = Path(out)
    _check_run_dir(out, resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the main process holds the lock
        return _train(cfg, out, resume=resume, quiet=quiet, tensorboard=tensorboard)
    with store.locked(out, "train", create=not resume):
        return _train(cfg, out, resume=resume, quiet=quiet, tensorboard=tensorboard)


def _train(cfg: Config, out: Path, *, resume: bool, quiet: bool, tensorboard: bool) -> Path:
    """The body of ``train``, run while the folder is locked."""
    out = Path(out)
    _check_run_dir(out, resume)
    cfg = load_config(out / "config.toml") if resume else resolve_paths(cfg)
    device = resolve_device(cfg.train.device)
    group = init_process_group(device)
    t = cfg.train
    torch.manual_seed(t.seed)  # initial weights; everything later uses derived generators
    method = METHODS[t.method]
    info = DATASETS[cfg.data.name]
    # Everything the user can get wrong (data, batch size, prototype file) is checked before the
    # run folder is created, so that a mistake leaves nothing behind.
    x_train, y_train, x_val, y_val = _load_data(cfg)
    if t.val_n:
        x_val, y_val = x_val[: t.val_n], y_val[: t.val_n]
    batch = t.batch_size
    if batch % group.world_size:
        raise UserError(f"train.batch_size = {batch} must be divisible by the {group.world_size} processes")
    steps_per_epoch = len(x_train) // batch
    if steps_per_epoch == 0:
        raise UserError(f"train.batch_size = {batch} is larger than the {len(x_train)} training images;"
                        f" use at most {len(x_train)}")
    prototypes = resolve_prototypes(cfg, method, info.num_classes)
    if not quiet and group.is_main:
        print(plan_text(cfg, len(x_train), steps_per_epoch, resumed=resume), flush=True)

    _prepare_run_dir(out, cfg, resume, group)
    group.barrier()
    # A fresh run always writes its own prototypes; a resumed run keeps the ones it trained with.
    if prototypes is not None and group.is_main and not (resume and (out / "prototypes.safetensors").exists()):
        save_prototypes(out / "prototypes.safetensors", prototypes, {
            "k": info.num_classes, "D": prototypes.shape[1], "metric": cfg.prototypes.metric,
            "epochs": cfg.prototypes.epochs, "lr": cfg.prototypes.lr, "seed": cfg.prototypes.seed})
    model = build_for_method(cfg, method, prototypes).to(device)
    if not (resume and (out / LAST).exists()):  # a resumed run reloads them from its checkpoint
        fit_to_data(model, x_train)  # data-dependent layers (fast_cifar's whitening)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = resolve_precision(t.precision, device)
    if device.type == "cpu" and amp_dtype == torch.bfloat16 and not cpu_has_native_bf16() and group.is_main:
        print("repulsor: note: train.precision = bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX):"
              " training runs 10-20x slower than in fp32 here; set train.precision = \"auto\" or \"fp32\"",
              file=sys.stderr, flush=True)
    optimizer = make_optimizer(model, t)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    lookahead = Lookahead(model, t.lookahead_every, t.lookahead_decay) if t.lookahead_every else None
    if device.type != "cpu":  # the training set and its augmentation live on the training device
        x_train, y_train = x_train.to(device), y_train.to(device)

    state = State()
    if resume and not (out / LAST).exists():
        # Killed before the first checkpoint: nothing to restore, start the run again.
        if group.is_main:
            _rewrite_metrics(out, 0)
        _log(out, "resumed before the first checkpoint: starting from epoch 1", group)
    elif resume:
        tensors, meta = ckpt.load_tensors(out / LAST)
        ckpt.load_model_state(model, tensors, out / LAST)
        ckpt.load_optimizer_state(optimizer, tensors, meta["optimizer"])
        if lookahead is not None:
            lookahead.load(tensors)
        if meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        state = State(**meta["state"])
        if state.finished:
            raise UserError(f"the run in {out} has already finished; evaluate it with: repulsor evaluate {out}")
        if group.is_main:
            _rewrite_metrics(out, state.epoch)
        _log(out, f"resumed at epoch {state.epoch + 1} step {state.step}", group)

    train_model = model
    if group.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    aug = _augmentation(cfg)
    writer = _tensorboard_writer(out, tensorboard, group)
    started = time.time()
    loop = Loop(cfg, out, model, optimizer, scaler, method, x_val, y_val, device, group, started, quiet, writer,
                lookahead)
    stopped_by = None

    with _StopSignal() as stop:
        while state.epoch < t.epochs:
            epoch = state.epoch
            order = torch.randperm(len(x_train), generator=generator(t.seed, "order", epoch))
            aug_gen = generator(t.seed, "augment", epoch)
            # Draw the augmentations of skipped steps too, so a resumed epoch sees the same crops.
            bar = tqdm(total=steps_per_epoch, initial=state.step, disable=quiet or not group.is_main,
                       desc=f"epoch {epoch + 1}/{t.epochs}", unit="step", leave=False, dynamic_ncols=True)
            model.train()
            for step in range(steps_per_epoch):
                index = order[step * batch : (step + 1) * batch]
                x_cpu = augment(x_train[index], generator=aug_gen, **aug)
                if step < state.step:
                    continue
                x = _to_device(x_cpu[group.rank :: group.world_size], device, t.channels_last)
                y = y_train[index][group.rank :: group.world_size].to(device)
                lr = lr_at(cfg, epoch + step / steps_per_epoch)
                for group_ in optimizer.param_groups:
                    group_["lr"] = lr * group_["lr_scale"]
                ctx = TrainContext(train_model, model, t, seed=derive_seed(t.seed, "attack", epoch, step))
                with autocast(device, amp_dtype):
                    loss, scores, passes = method.loss(ctx, x, y)
                if group.broadcast_flag(not torch.isfinite(loss).item(), device):
                    bar.close()
                    if state.epoch > 0 and (out / LAST).exists():
                        kept = (f"the last good checkpoint (end of epoch {state.epoch}) is kept in {out / LAST};"
                                f" lower train.lr (now {t.lr:g}) and start a new run with another --out")
                    else:
                        kept = (f"it happened before the first checkpoint, so no weights were kept;"
                                f" lower train.lr (now {t.lr:g}) and start the run again")
                    raise TrainingStopped(f"training stopped: the training loss became {loss.item()} at epoch"
                                          f" {epoch + 1} step {step + 1}; {kept}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if t.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if lookahead is not None:
                    done, total = epoch * steps_per_epoch + step + 1, t.epochs * steps_per_epoch
                    if done < total:
                        lookahead.step(model, done, done / total)
                    else:  # the last step leaves the slow weights in the model, as the recipe does
                        lookahead.pull(model, 1.0)
                sums = group.all_reduce_sum(
                    [loss.item() * len(y), (scores.argmax(1) == y).sum().item(), len(y)], device)
                state.sums = {k: state.sums[k] + v for k, v in zip(("loss", "correct", "seen"), sums)}
                state.passes = {"forward": state.passes["forward"] + passes.forward * sums[2],
                                "backward": state.passes["backward"] + passes.backward * sums[2],
                                "examples": state.passes["examples"] + sums[2]}
                state.step = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{state.sums['loss'] / state.sums['seen']:.4f}", lr=f"{lr:.4g}")
                if stop.received:
                    break
            bar.close()
            if stop.received and state.step < steps_per_epoch:
                stopped_by = stop.received
                break
            state = end_epoch(loop, state)
            if state.finished or stop.received:
                stopped_by = stop.received
                break

    state.elapsed += time.time() - started
    if stopped_by and not state.finished:
        if group.is_main:
            _save_checkpoint(out / LAST, model, optimizer, scaler, state, cfg, lookahead)
        _log(out, f"stopped by {stopped_by} at epoch {state.epoch + 1} step {state.step}; checkpoint saved", group)
        raise Interrupted(f"stopped by {stopped_by} at epoch {state.epoch + 1} step {state.step}; checkpoint saved;"
                          f" continue with: repulsor train --resume {out}")

    state.finished = True
    if group.is_main:
        _finish(cfg, out, model, optimizer, scaler, state, quiet)
    group.barrier()
    if cfg.eval.after_train:
        from ..evaluation.run import evaluate_run

        # Every rank takes part: under torchrun the evaluation shards its points over the ranks.
        evaluate_run(out, quiet=quiet, device=cfg.train.device)
    return out


def plan_text(cfg: Config, n_train: int, steps_per_epoch: int, *, resumed: bool = False) -> str:
    """What a training run will do, said before it starts (and what follows it)."""
    t, e = cfg.train, cfg.eval
    head = "resuming" if resumed else "training"
    text = (f"[train] {head} {t.method} ({cfg.model.name}) on {n_train} {cfg.data.name} images: {t.epochs} epochs of"
            f" {steps_per_epoch} steps of {t.batch_size}")
    if e.after_train:
        text += (f"; then evaluating suite {e.suite} on the first {e.n} test points at {e.norm} eps = {e.eps:.4g}"
                 " (--no-eval skips it)")
    else:
        text += "; no evaluation afterwards (eval.after_train = false)"
    return text


def catastrophic_overfitting(peak: float, now: float, n: int, drop: float) -> bool:
    """Whether validation PGD accuracy has collapsed from its peak (fgsm_rs's check).

    True when ``now`` is below ``(1 - drop) * peak`` and the fall exceeds three binomial
    standard errors of the peak on ``n`` points, so that validation noise never stops a run.
    A relative fall, not an absolute one: on CIFAR-10 at small scale FGSM training peaks at
    10-15% and collapses to 0%, which a fixed 0.2 drop would never see.
    """
    if n <= 0 or peak <= 0:
        return False
    noise = 3.0 * math.sqrt(peak * (1.0 - peak) / n)
    return now < (1.0 - drop) * peak and peak - now > noise


@dataclass
class Loop:
    """What the end of every epoch reads: the run, its model and optimiser, the validation
    data, where it runs, and where it reports (the training ``State`` changes; this does not)."""

    cfg: Config
    out: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    method: Method
    x_val: torch.Tensor
    y_val: torch.Tensor
    device: torch.device
    group: ProcessGroup
    started: float  # time.time() when this process began training
    quiet: bool
    writer: object = None  # a TensorBoard writer, or None
    lookahead: object = None  # the Lookahead slow weights, or None


def end_epoch(loop: Loop, state: State) -> State:
    """Validate, log, select, checkpoint; decide whether training stops."""
    cfg, out, model, optimizer, scaler = loop.cfg, loop.out, loop.model, loop.optimizer, loop.scaler
    method, x_val, y_val, device, group = loop.method, loop.x_val, loop.y_val, loop.device, loop.group
    started, quiet, writer, lookahead = loop.started, loop.quiet, loop.writer, loop.lookahead
    t = cfg.train
    epoch = state.epoch
    record = {
        "epoch": epoch + 1,
        "train_loss": state.sums["loss"] / max(1, state.sums["seen"]),
        "train_accuracy": state.sums["correct"] / max(1, state.sums["seen"]),
        "lr": lr_at(cfg, epoch + 1 - 1e-9),
        "seconds": state.elapsed + time.time() - started,
    }
    validating = len(x_val) and ((epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs)
    if validating:
        record.update(validate(model, x_val, y_val, cfg, device))
    state.epoch += 1
    state.step = 0
    state.sums = {"loss": 0.0, "correct": 0.0, "seen": 0.0}
    reason = None
    if validating:
        metric = record["val_robust"] if record["val_robust"] is not None else record["val_clean"]
        if metric > state.best_metric:
            state.best_metric, state.best_epoch, state.bad_epochs = metric, epoch + 1, 0
            if group.is_main:
                _save_checkpoint(out / BEST, model, optimizer, scaler, state, cfg, lookahead)
        else:
            state.bad_epochs += 1
        if t.early_stopping and state.bad_epochs >= t.patience:
            reason = f"early stopping: no better validation accuracy for {t.patience} epochs"
        if method.watch_overfitting and record["val_robust"] is not None:
            state.peak_robust = max(state.peak_robust, record["val_robust"])
            if catastrophic_overfitting(state.peak_robust, record["val_robust"], len(y_val), t.overfit_drop):
                reason = (f"catastrophic overfitting: validation PGD accuracy fell from {state.peak_robust:.3f}"
                          f" to {record['val_robust']:.3f}")
                record["catastrophic_overfitting"] = True
                state.overfitted = True
    if reason:
        record["stopped"] = reason
        state.finished, state.stopped = True, reason
    if group.is_main:
        _append(out / "metrics.jsonl", json.dumps(record))
        _save_checkpoint(out / LAST, model, optimizer, scaler, state, cfg, lookahead)
        line = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        _log(out, line, group)
        if not quiet:
            tqdm.write(line)
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    writer.add_scalar(key, value, record["epoch"])
            writer.flush()
    return state


def _finish(cfg, out: Path, model, optimizer, scaler, state: State, quiet: bool) -> None:
    """Select the final weights and save them with the training cost (rank 0 only)."""
    t = cfg.train
    selected = "last"
    # After catastrophic overfitting the last weights resist FGSM only; keep the epoch with the
    # best validation PGD accuracy instead, as Wong et al. do.
    if (t.early_stopping or state.overfitted) and (out / BEST).exists():
        tensors, _ = ckpt.load_tensors(out / BEST)
        ckpt.load_model_state(model, tensors, out / BEST)
        selected = f"best (epoch {state.best_epoch})"
    _save_checkpoint(out / LAST, model, optimizer, scaler, state, cfg)
    epochs_run = state.epoch
    cost = {
        "wall_seconds": state.elapsed,
        "epochs": epochs_run,
        "examples_seen": state.passes["examples"],
        "forward_passes_per_example": state.passes["forward"] / max(1.0, state.passes["examples"]),
        "backward_passes_per_example": state.passes["backward"] / max(1.0, state.passes["examples"]),
        # What "auto" became on this machine (bf16 only where the CPU or GPU runs it natively).
        "precision": precision_name(resolve_precision(t.precision, next(model.parameters()).device)),
    }
    ckpt.save_tensors(out / MODEL, ckpt.model_state(model),
                      {"config": to_dict(cfg), "selected": selected, "best_epoch": state.best_epoch, "cost": cost,
                       "fingerprint": store.run_fingerprint(out)})
    ckpt.atomic_write_json(out / "training.json", {"selected": selected, "best_epoch": state.best_epoch,
                                                   "best_val_metric": state.best_metric, "stopped": state.stopped,
                                                   "catastrophic_overfitting": state.overfitted, "cost": cost})
    if state.stopped:
        warning = f"WARN {state.stopped}; stopped at epoch {epochs_run} of {t.epochs}; weights: {selected}"
        _log(out, warning, ProcessGroup())
        if not quiet:
            print(warning, file=sys.stderr, flush=True)
    _log(out, f"finished: {epochs_run} epochs in {state.elapsed:.1f}s; weights: {selected}", ProcessGroup())

