"""Safe, atomic storage of runs: safetensors for tensors, JSON for everything else.

Every file is written to a temporary name in the same folder and then renamed over the
target, so a crash (or kill -9) leaves either the old file or the new one, never half of
one. A checkpoint is a single safetensors file whose metadata holds a JSON document
(config, epoch, optimiser hyperparameters, early-stopping state), so weights and their
metadata can never disagree. Nothing here uses pickle.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import UserError

_META_KEY = "repulsor"


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process umask (mkstemp's is 0600)."""
    mask = os.umask(0)  # there is no getter: set it and put it back
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write to {path.parent}: {error.strerror}; choose a writable folder") from None
    try:
        # mkstemp creates 0600; give the file the mode open() would, so a colleague on a
        # shared machine can read a report as they can read the log.
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            how = "free some space or choose another folder"
        elif path.is_dir():
            how = "it is a folder: give a file name"
        else:
            how = "choose another folder"
        raise UserError(f"cannot write {path}: {error.strerror or error}; {how}") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str = "file"):
    """Read a JSON file, turning absence or corruption into a ``UserError``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} is corrupt ({error}); delete it and run again") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Save tensors and a JSON-serialisable ``meta`` dict into one safetensors file, atomically."""
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    data = st_save(flat, metadata={_META_KEY: json.dumps(meta)})
    atomic_write_bytes(path, data)


def load_tensors(path: str | Path, what: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by ``save_tensors``; returns (tensors, meta) on the CPU."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a safetensors file") from None
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get(_META_KEY, "{}"))
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as error:
        detail = " ".join(str(error).split())  # one line: the CLI prints errors on one line
        raise UserError(f"{what} {path} is corrupt or not a repulsor safetensors file ({detail})") from None
    return tensors, meta


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with names prefixed ``model.``, unwrapped from DDP."""
    module = getattr(model, "module", model)
    return {f"model.{k}": v for k, v in module.state_dict().items()}


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Load ``model.``-prefixed tensors into ``model``; a mismatch is a ``UserError``."""
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    module = getattr(model, "module", model)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
            else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, the model needs {tuple(expected[wrong[0]].shape)}"
        )
        raise UserError(f"checkpoint {path} does not match the model in its config ({detail}); it belongs to"
                        " another run or the config was edited: restore the run's own files or train again")
    module.load_state_dict(state)


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser's state into tensors (for safetensors) and JSON hyperparameters."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Inverse of ``optimizer_state``."""
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
