"""The numbers behind a run's model figures, computed once and kept beside the report.

The figures of a run that need its model (adversarial examples, confusion matrix, prototype
geometry, robustness curve, nearest neighbours) are computed here from the model and the
test points, then saved to ``OUT/figures/<run>/figures.safetensors`` (tensors, and the numbers
and protocol as metadata). The report's sections are drawn from that file alone, so a report
re-renders without the model or the data: a later ``repulsor report`` with the same output
folder reuses the file while the protocol (points, threat model, seed, which figures) and the
model file (its size and time) are unchanged, and also when the model file is gone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import analyses
from ..analyses.neighbours import NEIGHBOUR_COUNTS
from ..attacks import evaluating
from ..data import DATASETS
from ..errors import UserError
from ..evaluation.cascade import evaluate
from ..store import files as ckpt
from ..store import layout
from ..store import run as store

FILE = "figures.safetensors"
FORMAT = 1
CURVE_N = 100  # points of a robustness curve computed by the report
GRID_COLUMNS = 8  # test points in the clean / adversarial / perturbation grid
NEIGHBOUR_POOL = 2000  # training images searched for nearest neighbours
NEIGHBOUR_ROWS = 6


@dataclass(frozen=True)
class Protocol:
    """What the figures of a run are computed under; a saved file is reused only under the same."""

    n: int
    eps: float
    norm: str
    seed: int
    batch_size: int  # the attack's seeds derive from the batch, so its numbers depend on it
    test_data: str  # the folder the test points come from ("" for the data set's default)
    curve: bool  # compute a robustness curve (no RUN/analysis/ curve to copy)
    confusion: bool  # compute the confusion matrix (none in RUN/analysis/)
    neighbours: bool  # compute the neighbour grid (none in RUN/analysis/)


def model_stamp(run_dir: Path) -> list | None:
    """The model file's size and modification time: a retrained model is a new stamp."""
    path = run_dir / layout.MODEL
    if not path.is_file():
        return None
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def load_saved(path: Path, run_dir: Path, protocol: Protocol) -> dict | None:
    """The saved figures of this run under ``protocol`` (None when absent, stale or unreadable)."""
    if not path.is_file():
        return None
    try:
        tensors, meta = ckpt.load_tensors(path, "report figure data")
    except UserError:
        return None
    stamp = model_stamp(run_dir)
    if (meta.get("format") != FORMAT or meta.get("protocol") != asdict(protocol)
            or meta.get("fingerprint") != store.run_fingerprint(run_dir)
            or (stamp is not None and meta.get("model") != stamp)):
        return None
    return {**meta, "tensors": tensors, "reused": True}


def compute(model, cfg, x: torch.Tensor, y: torch.Tensor, protocol: Protocol, *, data_dir, device, say) -> dict:
    """Attack the points with the ``quick`` suite's PGD-20 and compute every figure's numbers."""
    batch_size = cfg.eval.batch_size
    result = evaluate(model, x, y, suite="quick", eps=protocol.eps, norm=protocol.norm, batch_size=batch_size,
                      seed=protocol.seed, device=device, quiet=True, checks=False)
    x_adv = result.pop("x_adv")
    with evaluating(model):
        clean_pred = analyses.class_scores(model, x, batch_size, device).argmax(1)
        adv_pred = analyses.class_scores(model, x_adv, batch_size, device).argmax(1)
    meta = {"n": len(y), "clean_accuracy": result["clean_accuracy"], "robust_accuracy": result["robust_accuracy"]}
    tensors = _grid(x, y, x_adv, clean_pred, adv_pred)
    if protocol.curve:
        # Every other value of the analysis grid (eps, 1.25 eps, ..., 2 eps) on at most CURVE_N
        # points: a curve costs a PGD-20 per eps value.
        eps_values = analyses.curve_eps_values(protocol.eps, protocol.norm)[::2]
        m = min(len(y), CURVE_N)
        say(f"robustness curve over {len(eps_values)} eps values on {m} points")
        meta["curve"] = analyses.robustness_curve(model, x[:m], y[:m], eps_values=eps_values, norm=protocol.norm,
                                                  steps=20, seed=protocol.seed, batch_size=batch_size, device=device)
    if protocol.confusion:
        correct = clean_pred == y
        tensors["confusion"] = analyses.confusion_matrix(y[correct], adv_pred[correct], DATASETS[cfg.data.name].num_classes)
    if hasattr(model, "prototypes") and hasattr(model, "embed"):
        tensors.update(_geometry(model, x, y, batch_size, device))
        meta["cosine"] = getattr(model, "distance", None) == "cosine"
    if protocol.neighbours:
        say("nearest training neighbours")
        grid = analyses.NeighbourGrid(k=5, pool=NEIGHBOUR_POOL, rows=NEIGHBOUR_ROWS, restrict="predicted")
        found = analyses.find_neighbours(model, cfg, (x, y, x_adv), grid, data_dir=data_dir, seed=protocol.seed,
                                         batch_size=batch_size, device=device)
        if "skipped" in found:
            meta["neighbours_skipped"] = found["skipped"]
        else:
            meta["neighbours"] = {key: found[key] for key in NEIGHBOUR_COUNTS}
            tensors.update({f"neighbours.{key}": torch.as_tensor(found[key]) for key in
                            ("queries", "y", "pred", "query_ids", "indices", "train_images", "train_labels",
                             "train_ids", "distances")})
    return {**meta, "tensors": tensors, "reused": False}


def _grid(x, y, x_adv, clean_pred, adv_pred) -> dict:
    """The grid's points: those the attack fooled first, then the others, GRID_COLUMNS in all."""
    fooled = (clean_pred == y) & (adv_pred != y)
    chosen = torch.cat([fooled.nonzero().squeeze(1), (~fooled).nonzero().squeeze(1)])[:GRID_COLUMNS]
    return {"grid.ids": chosen, "grid.x": x[chosen], "grid.x_adv": x_adv[chosen], "grid.y": y[chosen],
            "grid.clean_pred": clean_pred[chosen], "grid.adv_pred": adv_pred[chosen]}


def _geometry(model, x, y, batch_size, device) -> dict:
    """The prototypes' cosine similarities and the 2-D PCA of the clean test embeddings."""
    P = model.prototypes.detach().float().cpu()
    z = analyses.embed_points(model, x, batch_size, device)
    projected = analyses.project_2d(z, P, normalise=getattr(model, "distance", None) == "cosine")
    return {"prototype_cosines": analyses.prototype_cosines(P), "pca.points": projected["points"],
            "pca.prototypes": projected["prototypes"], "pca.explained_variance": projected["explained_variance"],
            "pca.y": y}


def save(path: Path, run_dir: Path, protocol: Protocol, content: dict) -> None:
    """Keep ``content`` beside the report, with the protocol and the model's stamp it was computed under."""
    meta = {key: value for key, value in content.items() if key not in ("tensors", "reused")}
    meta.update(format=FORMAT, protocol=asdict(protocol), fingerprint=store.run_fingerprint(run_dir),
                model=model_stamp(run_dir))
    ckpt.save_tensors(path, content["tensors"], meta)
