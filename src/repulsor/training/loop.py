"""The one training loop, for every method.

Determinism by construction: the data order and the augmentation of epoch ``e`` come from
generators seeded by (seed, e), and the random start of a training-time attack at step
``s`` from (seed, e, s). A checkpoint records the epoch, the step inside the epoch and the
running sums, so a resumed run replays exactly the steps an uninterrupted run would take:
on the CPU in fp32 its weights and metrics are bitwise identical (tests/test_resume.py).

``train`` sets up a ``Loop`` (model, optimiser, data) and the ``State`` to continue from,
runs epoch after epoch of steps, calls ``end_epoch`` (validate, select, checkpoint, log)
after each, and finishes by saving the selected weights. The pieces it uses: ``methods``
(the losses), ``schedule`` (learning rate, optimiser, lookahead), ``validation``,
``checkpoint`` (the resumable ``State``) and ``folder`` (the run folder it writes).

Run directory layout: see docs/design.md.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config, load_config, resolve_paths
from ..data import DATASETS, alternating_flips, augment, configured_augmentation, load_dataset
from ..errors import Interrupted, UserError
from ..formats import wilson_interval
from ..models import build_for_method, fit_to_data
from ..prototypes import check_prototypes, generate_prototypes, load_prototypes, mmc_centres
from ..runtime import (ProcessGroup, autocast, cpu_has_native_bf16, derive_seed, generator, init_process_group,
    live_progress, precision_name, resolve_device, resolve_precision)
from ..store import files as ckpt
from ..store import run as store
from ..store.layout import BEST, CONFIG, LAST, PROTOTYPES
from .checkpoint import State, load_checkpoint, save_checkpoint
from .folder import (append_metrics, check_run_dir, log, prepare_run_dir, rewrite_metrics, save_final,
    save_run_prototypes, tensorboard_writer)
from .methods import METHODS, Method, TrainContext
from .schedule import Lookahead, lr_at, make_optimizer, set_lr
from .validation import catastrophic_overfitting, validate

__all__ = ["Loop", "TrainingStopped", "end_epoch", "plan_text", "resolve_prototypes", "train"]


class TrainingStopped(UserError):
    """Training stopped early for a reason the user must hear about (NaN loss, overfitting)."""


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


@dataclass
class Loop:
    """What training reads and does not change: the run, its model and optimiser, the data,
    where it runs, and where it reports (the training ``State`` changes; this does not)."""

    cfg: Config
    out: Path
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model trained through: ``model``, or it wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scaler: object
    lookahead: Lookahead | None  # the slow weights, or None
    method: Method
    amp_dtype: object  # the autocast dtype (``runtime.resolve_precision``)
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    steps_per_epoch: int
    augmentation: dict  # keyword arguments of ``data.augment``
    first_flips: torch.Tensor | None  # data.flip = "alternate": the images mirrored in even epochs
    device: torch.device
    group: ProcessGroup
    started: float  # time.time() when this process began training
    quiet: bool
    writer: object = None  # a TensorBoard writer, or None


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
    check_run_dir(out, resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the main process holds the lock
        return _train(cfg, out, resume=resume, quiet=quiet, tensorboard=tensorboard)
    with store.locked(out, "train", create=not resume):
        return _train(cfg, out, resume=resume, quiet=quiet, tensorboard=tensorboard)


def _train(cfg: Config, out: Path, *, resume: bool, quiet: bool, tensorboard: bool) -> Path:
    """The body of ``train``, run while the folder is locked."""
    loop, state = _start(cfg, Path(out), resume=resume, quiet=quiet, tensorboard=tensorboard)
    with _StopSignal() as stop:
        state, stopped_by = _run_epochs(loop, state, stop)
    state.elapsed += time.time() - loop.started
    if stopped_by and not state.finished:
        _interrupted(loop, state, stopped_by)
    state.finished = True
    if loop.group.is_main:
        _finish(loop, state)
    loop.group.barrier()
    if loop.cfg.eval.after_train:
        from ..evaluation.run import evaluate_run

        # Every rank takes part: under torchrun the evaluation shards its points over the ranks.
        evaluate_run(loop.out, quiet=quiet, device=loop.cfg.train.device)
    return loop.out


def _start(cfg: Config, out: Path, *, resume: bool, quiet: bool, tensorboard: bool) -> tuple[Loop, State]:
    """Everything before the first step: the config, data and prototypes (checked before the run
    folder is written), the folder, the model and optimiser, and the state to continue from."""
    check_run_dir(out, resume)
    cfg = load_config(out / CONFIG) if resume else resolve_paths(cfg)
    device = resolve_device(cfg.train.device)
    group = init_process_group(device)
    t = cfg.train
    torch.manual_seed(t.seed)  # initial weights; everything later uses derived generators
    method = METHODS[t.method]
    info = DATASETS[cfg.data.name]
    # Everything the user can get wrong (data, batch size, prototype file) is checked before the
    # run folder is created, so that a mistake leaves nothing behind.
    x_train, y_train, x_val, y_val = _load_data(cfg)
    steps_per_epoch = _steps_per_epoch(t.batch_size, len(x_train), group)
    prototypes = resolve_prototypes(cfg, method, info.num_classes)
    if not quiet and group.is_main:
        print(plan_text(cfg, len(x_train), steps_per_epoch, resumed=resume), flush=True)

    prepare_run_dir(out, cfg, resume, group)
    group.barrier()
    # A fresh run always writes its own prototypes; a resumed run keeps the ones it trained with.
    if prototypes is not None and group.is_main and not (resume and (out / PROTOTYPES).exists()):
        save_run_prototypes(out, cfg, prototypes, info.num_classes)
    model = build_for_method(cfg, method, prototypes).to(device)
    if not (resume and (out / LAST).exists()):  # a resumed run reloads them from its checkpoint
        fit_to_data(model, x_train)  # data-dependent layers (fast_cifar's whitening)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = _precision(t.precision, device, group)
    optimizer = make_optimizer(model, t)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    lookahead = Lookahead(model, t.lookahead_every, t.lookahead_decay) if t.lookahead_every else None
    if device.type != "cpu":  # the training set and its augmentation live on the training device
        x_train, y_train = x_train.to(device), y_train.to(device)
    state = _restore(out, group, model, optimizer, scaler, lookahead) if resume else State()

    train_model = model
    if group.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    d = cfg.data
    augmentation = configured_augmentation(d.name, d.augment, d.crop_padding, d.padding)
    first_flips = _first_flips(cfg, len(x_train))
    writer = tensorboard_writer(out, tensorboard, group)
    loop = Loop(cfg=cfg, out=out, model=model, train_model=train_model, optimizer=optimizer, scaler=scaler,
                lookahead=lookahead, method=method, amp_dtype=amp_dtype, x_train=x_train, y_train=y_train,
                x_val=x_val, y_val=y_val, steps_per_epoch=steps_per_epoch, augmentation=augmentation,
                first_flips=first_flips, device=device,
                group=group, started=time.time(), quiet=quiet, writer=writer)
    return loop, state


def _load_data(cfg: Config):
    """The training and validation splits, cut to ``train_subset`` and ``val_n``."""
    d = cfg.data
    kwargs = dict(data_dir=d.data_dir or None, val_size=d.val_size or None, split_seed=d.split_seed)
    x_train, y_train = load_dataset(d.name, "train", **kwargs)
    x_val, y_val = load_dataset(d.name, "val", **kwargs)
    if d.train_subset:
        x_train, y_train = x_train[: d.train_subset], y_train[: d.train_subset]
    if cfg.train.val_n:
        x_val, y_val = x_val[: cfg.train.val_n], y_val[: cfg.train.val_n]
    return x_train, y_train, x_val, y_val


def _steps_per_epoch(batch: int, n_train: int, group: ProcessGroup) -> int:
    if batch % group.world_size:
        raise UserError(f"train.batch_size = {batch} must be divisible by the {group.world_size} processes")
    steps_per_epoch = n_train // batch
    if steps_per_epoch == 0:
        raise UserError(f"train.batch_size = {batch} is larger than the {n_train} training images;"
                        f" use at most {n_train}")
    return steps_per_epoch


def _precision(precision: str, device: torch.device, group: ProcessGroup):
    """The autocast dtype of ``train.precision`` on ``device``, with a note where bf16 is emulated."""
    amp_dtype = resolve_precision(precision, device)
    if device.type == "cpu" and amp_dtype == torch.bfloat16 and not cpu_has_native_bf16() and group.is_main:
        print("repulsor: note: train.precision = bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX):"
              " training runs 10-20x slower than in fp32 here; set train.precision = \"auto\" or \"fp32\"",
              file=sys.stderr, flush=True)
    return amp_dtype


def _first_flips(cfg: Config, n_train: int) -> torch.Tensor | None:
    """The images mirrored in epoch 0 under ``data.flip = "alternate"`` (None otherwise; the
    config refuses alternate flips where the augmentation has none)."""
    if cfg.data.flip != "alternate":
        return None
    return torch.rand(n_train, generator=generator(cfg.train.seed, "flips")) < 0.5


def _restore(out: Path, group: ProcessGroup, model, optimizer, scaler, lookahead) -> State:
    """The state a resumed run continues from, its checkpoint loaded into the model and optimiser."""
    if not (out / LAST).exists():
        # Killed before the first checkpoint: nothing to restore, start the run again.
        if group.is_main:
            rewrite_metrics(out, 0)
        log(out, "resumed before the first checkpoint: starting from epoch 1", group)
        return State()
    state = load_checkpoint(out / LAST, model, optimizer, scaler, lookahead)
    if state.finished:
        raise UserError(f"the run in {out} has already finished; evaluate it with: repulsor evaluate {out}")
    if group.is_main:
        rewrite_metrics(out, state.epoch)
    log(out, f"resumed at epoch {state.epoch + 1} step {state.step}", group)
    return state


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


def _run_epochs(loop: Loop, state: State, stop: _StopSignal) -> tuple[State, str | None]:
    """Train until the last epoch, a stop decided at an epoch's end, or a signal (returned)."""
    while state.epoch < loop.cfg.train.epochs:
        _run_epoch(loop, state, stop)
        if stop.received and state.step < loop.steps_per_epoch:
            return state, stop.received
        state = end_epoch(loop, state)  # the module's global: tests replace it
        if state.finished or stop.received:
            return state, stop.received
    return state, None


def _run_epoch(loop: Loop, state: State, stop: _StopSignal) -> None:
    """The steps of epoch ``state.epoch`` from step ``state.step`` on, until a signal arrives."""
    t, group, steps_per_epoch = loop.cfg.train, loop.group, loop.steps_per_epoch
    epoch, batch = state.epoch, t.batch_size
    order = torch.randperm(len(loop.x_train), generator=generator(t.seed, "order", epoch))
    aug_gen = generator(t.seed, "augment", epoch)
    flips = None if loop.first_flips is None else alternating_flips(loop.first_flips, epoch)
    # Draw the augmentations of skipped steps too, so a resumed epoch sees the same crops.
    bar = tqdm(total=steps_per_epoch, initial=state.step, disable=loop.quiet or not group.is_main or not live_progress(),
               desc=f"epoch {epoch + 1}/{t.epochs}", unit="step", leave=False, dynamic_ncols=True)
    loop.model.train()
    for step in range(steps_per_epoch):
        index = order[step * batch : (step + 1) * batch]
        x_cpu = augment(loop.x_train[index], generator=aug_gen, mirrored=None if flips is None else flips[index],
                        **loop.augmentation)
        if step < state.step:
            continue
        x = _to_device(x_cpu[group.rank :: group.world_size], loop.device, t.channels_last)
        y = loop.y_train[index][group.rank :: group.world_size].to(loop.device)
        try:
            lr = _train_step(loop, state, step, x, y)
        except TrainingStopped:
            bar.close()
            raise
        bar.update(1)
        bar.set_postfix(loss=f"{state.sums['loss'] / state.sums['seen']:.4f}", lr=f"{lr:.4g}")
        if stop.received:
            break
    bar.close()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _train_step(loop: Loop, state: State, step: int, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimiser step on this process's share of a batch; returns the learning rate it used."""
    t, model, optimizer, scaler, device = loop.cfg.train, loop.model, loop.optimizer, loop.scaler, loop.device
    epoch, steps_per_epoch = state.epoch, loop.steps_per_epoch
    lr = lr_at(loop.cfg, epoch + step / steps_per_epoch)
    set_lr(optimizer, lr)
    ctx = TrainContext(loop.train_model, model, t, seed=derive_seed(t.seed, "attack", epoch, step),
                       progress=(epoch + step / steps_per_epoch) / t.epochs)
    with autocast(device, loop.amp_dtype):
        loss, scores, passes = loop.method.loss(ctx, x, y)
    if loop.group.broadcast_flag(not torch.isfinite(loss).item(), device):
        raise _diverged(loop, state, step, loss)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if t.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if loop.lookahead is not None:
        loop.lookahead.after(model, epoch * steps_per_epoch + step + 1, t.epochs * steps_per_epoch)
    sums = loop.group.all_reduce_sum([loss.item() * len(y), (scores.argmax(1) == y).sum().item(), len(y)], device)
    state.sums = {k: state.sums[k] + v for k, v in zip(("loss", "correct", "seen"), sums)}
    state.passes = {"forward": state.passes["forward"] + passes.forward * sums[2],
                    "backward": state.passes["backward"] + passes.backward * sums[2],
                    "examples": state.passes["examples"] + sums[2]}
    state.step = step + 1
    return lr


def _diverged(loop: Loop, state: State, step: int, loss: torch.Tensor) -> TrainingStopped:
    """The error for a loss that is no longer finite, saying which weights were kept."""
    lr, out = loop.cfg.train.lr, loop.out
    if state.epoch > 0 and (out / LAST).exists():
        kept = (f"the last good checkpoint (end of epoch {state.epoch}) is kept in {out / LAST};"
                f" lower train.lr (now {lr:g}) and start a new run with another --out")
    else:
        kept = (f"it happened before the first checkpoint, so no weights were kept;"
                f" lower train.lr (now {lr:g}) and start the run again")
    return TrainingStopped(f"training stopped: the training loss became {loss.item()} at epoch"
                           f" {state.epoch + 1} step {step + 1}; {kept}")


def end_epoch(loop: Loop, state: State) -> State:
    """Validate, log, select, checkpoint; decide whether training stops."""
    t, group = loop.cfg.train, loop.group
    epoch = state.epoch
    record = {
        "epoch": epoch + 1,
        "train_loss": state.sums["loss"] / max(1, state.sums["seen"]),
        "train_accuracy": state.sums["correct"] / max(1, state.sums["seen"]),
        "lr": lr_at(loop.cfg, epoch + 1 - 1e-9),
        "seconds": state.elapsed + time.time() - loop.started,
    }
    validating = len(loop.x_val) and ((epoch + 1) % t.val_every == 0 or epoch + 1 == t.epochs)
    if validating:
        record.update(validate(loop.model, loop.x_val, loop.y_val, loop.cfg, loop.device))
    state.epoch += 1
    state.step = 0
    state.sums = {"loss": 0.0, "correct": 0.0, "seen": 0.0}
    reason = _select(loop, state, record) if validating else None
    if reason:
        record["stopped"] = reason
        state.finished, state.stopped = True, reason
    if group.is_main:
        append_metrics(loop.out, record)
        _checkpoint(loop, state, LAST)
        line = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        log(loop.out, line, group)
        if not loop.quiet:
            tqdm.write(line)
        if loop.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    loop.writer.add_scalar(key, value, record["epoch"])
            loop.writer.flush()
    return state


def _select(loop: Loop, state: State, record: dict) -> str | None:
    """Keep the best weights so far after a validation; the reason training stops, if it does."""
    t, reason = loop.cfg.train, None
    metric = record["val_robust"] if record["val_robust"] is not None else record["val_clean"]
    if metric > state.best_metric:
        state.best_metric, state.best_epoch, state.bad_epochs = metric, record["epoch"], 0
        if loop.group.is_main:
            _checkpoint(loop, state, BEST)
    else:
        state.bad_epochs += 1
    if t.early_stopping and state.bad_epochs >= t.patience:
        reason = f"early stopping: no better validation accuracy for {t.patience} epochs"
    if loop.method.watch_overfitting and record["val_robust"] is not None:
        state.peak_robust = max(state.peak_robust, record["val_robust"])
        if catastrophic_overfitting(state.peak_robust, record["val_robust"], len(loop.y_val), t.overfit_drop):
            reason = (f"catastrophic overfitting: validation PGD accuracy fell from {state.peak_robust:.3f}"
                      f" to {record['val_robust']:.3f}")
            record["catastrophic_overfitting"] = True
            state.overfitted = True
    return reason


def _checkpoint(loop: Loop, state: State, name: str) -> None:
    save_checkpoint(loop.out / name, loop.model, loop.optimizer, loop.scaler, state, loop.cfg, loop.lookahead)


def _interrupted(loop: Loop, state: State, stopped_by: str) -> None:
    """Save a checkpoint where a signal stopped training, and raise ``Interrupted``."""
    out = loop.out
    if loop.group.is_main:
        _checkpoint(loop, state, LAST)
    log(out, f"stopped by {stopped_by} at epoch {state.epoch + 1} step {state.step}; checkpoint saved", loop.group)
    raise Interrupted(f"stopped by {stopped_by} at epoch {state.epoch + 1} step {state.step}; checkpoint saved;"
                      f" continue with: repulsor train --resume {out}")


def _finish(loop: Loop, state: State) -> None:
    """Select the final weights and save them with the training cost (rank 0 only)."""
    cfg, out, model, t = loop.cfg, loop.out, loop.model, loop.cfg.train
    selected = "last"
    # After catastrophic overfitting the last weights resist FGSM only; keep the epoch with the
    # best validation PGD accuracy instead, as Wong et al. do.
    if (t.early_stopping or state.overfitted) and (out / BEST).exists():
        tensors, _ = ckpt.load_tensors(out / BEST)
        ckpt.load_model_state(model, tensors, out / BEST)
        selected = f"best (epoch {state.best_epoch})"
    save_checkpoint(out / LAST, model, loop.optimizer, loop.scaler, state, cfg)  # without the slow weights
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
    record = {"selected": selected, "best_epoch": state.best_epoch, "best_val_metric": state.best_metric,
              "stopped": state.stopped, "catastrophic_overfitting": state.overfitted, "cost": cost}
    n_val = len(loop.y_val)
    if n_val and isinstance(state.best_metric, (int, float)) and 0 <= state.best_metric <= 1:
        # the validation accuracy that selected the epoch, on the val_n points it was measured on
        record["val_n"] = n_val
        record["best_val_metric_ci95"] = [round(b, 6) for b in wilson_interval(round(state.best_metric * n_val), n_val)]
    save_final(out, cfg, model, record)
    if state.stopped:
        warning = f"WARN {state.stopped}; stopped at epoch {epochs_run} of {t.epochs}; weights: {selected}"
        log(out, warning, loop.group)
        if not loop.quiet:
            print(warning, file=sys.stderr, flush=True)
    log(out, f"finished: {epochs_run} epochs in {state.elapsed:.1f}s; weights: {selected}", loop.group)
