"""Device, precision and process-group plumbing shared by training and evaluation."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present (the local rank's GPU under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this machine has no CUDA GPU; use the CPU"
                        " (train: --set train.device=cpu; evaluate: --device cpu)")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions and matrix products natively (AVX-512 BF16 or
    AMX, through oneDNN). Without it (an AVX2-only CPU) bf16 falls back to reference kernels
    that are 10-20x slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` is bf16 on a CPU with native bf16 (about 2-2.7x faster than fp32 there), fp32
    on a CPU without it (where bf16 is 10-20x slower), bf16 on GPUs that support it, and
    fp16 (with loss scaling) on older GPUs.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise UserError("train.precision = fp16 is for CUDA; on the CPU use bf16 or fp32")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    if device.type == "cpu" and not cpu_has_native_bf16():
        return None
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def live_progress() -> bool:
    """Whether progress bars may redraw: only when stderr is a terminal. Written to a file (CI,
    ``nohup``, a SLURM job) every redraw would be a carriage-return frame in the log; there the
    one line per epoch and per attack says the same."""
    return sys.stderr.isatty()


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any tuple of ints and strings (same on every machine and rank)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded by ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits among the training processes (torchrun sets the variables)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum a few floats over all processes (identity in a single process)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        """True on every process if it is true on any."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_process_group(device: torch.device) -> ProcessGroup:
    """Join the torchrun process group when WORLD_SIZE > 1: gloo on the CPU, nccl on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size())


UNCOMMITTED = "produced from uncommitted changes"
# What "the code" is, for provenance: the package and its build definition. Records under results/ and
# docs change while a comparison runs; they do not change what the code computes.
_CODE = (":/src", ":/pyproject.toml")


def code_diff() -> str | None:
    """A short hash (sha256, 16 hex digits) of the uncommitted changes to the code (``git diff HEAD``
    of ``src/`` and ``pyproject.toml``), recorded beside a ``.dirty`` code version; None for a clean
    code tree or outside a checkout."""
    import subprocess

    try:
        diff = subprocess.run(["git", "diff", "HEAD", "--", *_CODE], cwd=os.path.dirname(__file__),
                              capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return hashlib.sha256(diff).hexdigest()[:16] if diff else None


def provenance() -> dict:
    """``{"code_version": ...}`` plus, from a dirty tree, ``"code_diff"`` (``code_diff``)."""
    version, diff = code_version(), code_diff()
    return {"code_version": version, **({"code_diff": diff} if diff and version.endswith(".dirty") else {})}


def provenance_warning(record: dict) -> str | None:
    """The warning a record made from uncommitted changes carries, or None."""
    if not str(record.get("code_version", "")).endswith(".dirty"):
        return None
    diff = record.get("code_diff")
    return f"{UNCOMMITTED} ({record['code_version']}" + (f", diff {diff})" if diff else ")")


def code_version() -> str:
    """The package version plus the git commit of the source tree, when it is a checkout, and
    ``.dirty`` when the code (``src/``, ``pyproject.toml``) has uncommitted changes (until 0.6.0 any
    tracked file counted, records under results/ included)."""
    import subprocess

    from .version import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__),
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *_CODE],
                               cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if not commit:
        return __version__
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"
