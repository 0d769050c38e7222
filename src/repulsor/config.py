"""Experiment configuration: frozen dataclasses, TOML files, ``section.key=value`` overrides.

A config file is TOML data with the sections ``[data] [model] [prototypes] [train] [eval]``;
it is parsed, never executed. Every value is checked against the dataclass schema below:
an unknown key, a wrong type or an out-of-range value raises ``UserError`` naming it.
Perturbation sizes may be written as fractions, ``eps = "8/255"``, so that nobody has to
type 0.03137254901960784; an L-inf eps above 1 is refused because images live in [0, 1] (an L2 or
L1 eps is bounded by the image box's diameter in its norm instead).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import tomli_w

from .store.layout import CONFIG
from .errors import UserError


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    data_dir: str = ""  # folder of the data set; "" = $REPULSOR_DATA/<name>
    test_dir: str = ""  # optional separate folder for the test split (e.g. exact CIFAR-10 pixels)
    val_size: float = 0.0  # >= 1: a count; in (0, 1): a fraction; 0: default (1000 or 10%)
    train_subset: int = 0  # use only the first N training images (0 = all); for CPU presets
    split_seed: int = 0
    augment: str = "auto"  # auto (crop+flip for CIFAR, none otherwise) | none | crop_flip
    crop_padding: int = 4  # crop_flip (and auto on CIFAR): translations of up to this many pixels
    padding: str = "zeros"  # what the translations bring in at the border: zeros | reflect
    flip: str = "random"  # random (a fresh half each epoch) | alternate (each image mirrored every other epoch)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"  # resnet18 | preact_resnet18 | wrn | small_cnn | mlp | fast_cifar
    width: float = 1.0
    depth: int = 34  # wrn only
    widen_factor: int = 10  # wrn only
    centre_features: bool = True  # fast_cifar only: batch-normalise the pooled features (no scale, no shift)
    whiten_directions: int = 0  # fast_cifar only: keep the largest N of the C*4 patch directions (0 = all)
    output_scale: float = 1 / 9  # fast_cifar only: the factor on its output (the published 1/9)
    normalize: bool = True  # the data set's mean/std as the model's first layer; false: raw [0, 1] pixels (the authors' code)


@dataclass(frozen=True)
class PrototypeConfig:
    dim: int = 100  # output dimension D
    metric: str = "linf"  # separation metric of Eq. 5: linf | l2 | cosine | linf_sum (the authors' code: unbounded)
    epochs: int = 100
    lr: float = 0.01
    seed: int = 0
    distance: str = "cosine"  # decision rule (and, with train.objective = "rule", the loss): cosine (Eq. 6) | linf | l2 | dot_linf | dot_l2 (the authors' code's rules)
    file: str = ""  # load prototypes from this safetensors file instead of generating them


@dataclass(frozen=True)
class TrainConfig:
    method: str = "prototype"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1  # peak learning rate
    lr_min: float = 0.0  # cyclic schedule's lower bound
    warmup: float = 0.4  # cyclic schedule: fraction of training at which the rate peaks
    schedule: str = "cyclic"  # cyclic | onecycle | multistep | constant
    milestones: list[int] = field(default_factory=list)  # multistep, in epochs
    gamma: float = 0.1  # multistep decay factor
    optimizer: str = "sgd"  # sgd | adam (AdamW: decoupled weight decay; momentum is its beta1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    bias_lr_scale: float = 1.0  # biases (1-d *.bias parameters) train at lr * this and weight decay / this
    label_smoothing: float = 0.0  # methods whose loss is cross-entropy only
    lookahead_every: int = 0  # every N steps pull the weights to their slow average (0 = off)
    lookahead_decay: float = 0.95  # per step; its N-th power, ramped in by (progress)^3, weights the slow average
    grad_clip: float = 0.0  # 0 = off
    precision: str = "auto"  # auto (bf16 on CPU, fp16 on CUDA) | fp32 | bf16 | fp16
    channels_last: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    # Threat model used by adversarial-training methods and by validation robust accuracy.
    norm: str = "linf"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    attack_steps: int = 10
    trades_beta: float = 6.0
    pcl_weight: float = 1.0  # pcl: weight of the conformity loss next to cross-entropy
    pcl_push: float = 1e-4  # pcl: weight of the push from other centres (Mustafa et al.'s code)
    # Prototype heads: the training loss. "rule": the one the decision rule defines (Eq. 6 for cosine,
    # the distance to p_y otherwise); the authors' code's two: linf_distance ("inf") | batch_cosine ("mean").
    objective: str = "rule"
    # Model selection on the validation split (never on the test split).
    early_stopping: bool = False
    patience: int = 10
    val_every: int = 1
    val_n: int = 1000  # validation points for clean and robust accuracy
    val_attack_steps: int = 10
    # Figure 4: more PGD losses run on the validation split each epoch, recorded as val_robust_<loss>
    # (e.g. ["proto_linf", "ce"]: the authors' loss and cross-entropy); selection still reads val_robust.
    val_losses: list[str] = field(default_factory=list)
    fgsm_alpha: float = 1.25  # fgsm_rs step as a multiple of eps (Wong et al.)
    ibp_warmup: float = 0.05  # ibp: the fraction of training with eps = 0 (clean cross-entropy)
    ibp_ramp: float = 0.5  # ibp: the fraction of training over which eps rises to train.eps
    overfit_drop: float = 0.5  # fgsm_rs: catastrophic overfitting when val robust acc falls by this fraction of its peak


@dataclass(frozen=True)
class EvalConfig:
    suite: str = "quick"
    n: int = 1000  # first N test points, unshuffled
    norm: str = "linf"
    eps: float = 8 / 255
    batch_size: int = 256
    seed: int = 0
    after_train: bool = True  # evaluate on the test split when training ends


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTION_TYPES = {
    "data": DataConfig,
    "model": ModelConfig,
    "prototypes": PrototypeConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}

def _dataset_names() -> tuple:
    from .data import DATASETS  # late imports: data and models import torch, config should stay light

    return tuple(DATASETS)


def _model_names() -> tuple:
    from .models import MODELS

    return tuple(MODELS)


def _paddings() -> tuple:
    from .data.augmentation import PADDINGS

    return PADDINGS


def _flips() -> tuple:
    from .data.augmentation import FLIPS

    return FLIPS


def _objective_names() -> tuple:
    from .training.methods import OBJECTIVES

    return OBJECTIVES


def _rule_names() -> tuple:
    from .models.heads import DISTANCES

    return tuple(d for d in DISTANCES if d != "sqeuclid")  # sqeuclid is MMC's own


def _norm_names() -> tuple:
    from .attacks.geometry import GEOMETRIES

    return tuple(GEOMETRIES)


def _metric_names() -> tuple:
    from .prototypes import METRICS

    return tuple(METRICS)


# The allowed values of a setting: a tuple, or a function reading the registry that owns the names.
CHOICES = {
    ("data", "name"): _dataset_names,
    ("data", "augment"): ("auto", "none", "crop_flip"),
    ("data", "padding"): _paddings,
    ("data", "flip"): _flips,
    ("model", "name"): _model_names,
    ("prototypes", "metric"): _metric_names,
    ("prototypes", "distance"): _rule_names,
    ("train", "objective"): _objective_names,
    ("train", "optimizer"): ("sgd", "adam"),
    ("train", "schedule"): ("cyclic", "onecycle", "multistep", "constant"),
    ("train", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("train", "norm"): _norm_names,
    ("eval", "norm"): _norm_names,
}

# The untargeted attack losses (attacks.losses) that train.val_losses may name.
VAL_LOSSES = ("ce", "cw", "dlr", "proto_margin", "proto_linf")

# (section, key) -> (low, high, low_inclusive); None means unbounded.
RANGES = {
    ("data", "val_size"): (0.0, None, True),
    ("data", "train_subset"): (0, None, True),
    ("data", "crop_padding"): (0, None, True),
    ("model", "width"): (0.0, None, False),
    ("model", "depth"): (10, None, True),
    ("model", "widen_factor"): (1, None, True),
    ("model", "whiten_directions"): (0, None, True),
    ("model", "output_scale"): (0.0, None, False),
    ("prototypes", "dim"): (2, None, True),
    ("prototypes", "epochs"): (0, None, True),
    ("prototypes", "lr"): (0.0, None, False),
    ("train", "epochs"): (1, None, True),
    ("train", "batch_size"): (1, None, True),
    ("train", "lr"): (0.0, None, False),
    ("train", "lr_min"): (0.0, None, True),
    ("train", "warmup"): (0.0, 1.0, False),
    ("train", "bias_lr_scale"): (0.0, None, False),
    ("train", "label_smoothing"): (0.0, 0.99, True),
    ("train", "lookahead_every"): (0, None, True),
    ("train", "lookahead_decay"): (0.0, 1.0, True),
    ("train", "gamma"): (0.0, 1.0, False),
    ("train", "momentum"): (0.0, 1.0, True),
    ("train", "weight_decay"): (0.0, None, True),
    ("train", "grad_clip"): (0.0, None, True),
    ("train", "eps"): (0.0, None, True),  # at most the box's diameter in train.norm: _check_consistency
    ("train", "alpha"): (0.0, None, True),
    ("train", "attack_steps"): (1, None, True),
    ("train", "trades_beta"): (0.0, None, True),
    ("train", "pcl_weight"): (0.0, None, True),
    ("train", "pcl_push"): (0.0, None, True),
    ("train", "patience"): (1, None, True),
    ("train", "val_every"): (1, None, True),
    ("train", "val_n"): (0, None, True),
    ("train", "val_attack_steps"): (1, None, True),
    ("train", "fgsm_alpha"): (0.0, None, False),
    ("train", "overfit_drop"): (0.0, 1.0, False),
    ("train", "ibp_warmup"): (0.0, 1.0, True),
    ("train", "ibp_ramp"): (0.0, 1.0, False),
    ("eval", "n"): (1, None, True),
    ("eval", "eps"): (0.0, None, True),  # at most the box's diameter in eval.norm
    ("eval", "batch_size"): (1, None, True),
}

_PIXEL_KEYS = {"eps", "alpha"}


def parse_fraction(text: str) -> float:
    """Read ``"8/255"`` or ``"0.5"`` as a float; raises ValueError or ZeroDivisionError."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def _parse_fraction(where: str, text: str) -> float:
    try:
        value = parse_fraction(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{where}: cannot read {text!r} as a number (write 0.0314 or \"8/255\")") from None
    if not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {text!r}")
    return value


def coerce(section: str, key: str, value, expected):
    """Check ``value`` against the annotated type and return it in that type."""
    where = f"{section}.{key}"
    origin = typing.get_origin(expected)
    if origin is list:
        (item,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list of {item.__name__}, got {value!r}")
        return [coerce(section, key, v, item) for v in value]
    if expected is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, str) and key in _PIXEL_KEYS:
            return _parse_fraction(where, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # nan passes every range check and inf breaks training
            raise UserError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {expected!r}")  # a schema bug, not a user error


def _check_value(section: str, key: str, value) -> None:
    where = f"{section}.{key}"
    choices = CHOICES.get((section, key))
    choices = choices() if callable(choices) else choices
    if choices is not None and value not in choices:
        raise UserError(f"{where} = {value!r} is not one of {', '.join(choices)}")
    bounds = RANGES.get((section, key))
    if bounds is None:
        return
    low, high, low_inclusive = bounds
    if low is not None and (value < low or (value == low and not low_inclusive)):
        relation = ">=" if low_inclusive else ">"
        raise UserError(f"{where} = {value!r} is out of range: it must be {relation} {low:g}")
    if high is not None and value > high:
        raise UserError(f"{where} = {value!r} is out of range: it must be <= {high:g}")


# Settings that older versions wrote and never read: accepted in old run folders, then dropped.
RETIRED = {("train", "log_every")}


def _build_section(section: str, values: dict, base):
    cls = SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    updates = {}
    for key, value in values.items():
        if (section, key) in RETIRED:
            continue  # written by an older version; it never changed anything
        if key not in known:
            raise UserError(f"unknown key {section}.{key}: valid keys are {', '.join(sorted(known))}")
        updates[key] = coerce(section, key, value, hints[key])
        _check_value(section, key, updates[key])
    return replace(base, **updates)


def from_dict(raw: dict, base: Config | None = None) -> Config:
    """Build a validated ``Config`` from nested dictionaries (``{"train": {"lr": 0.1}}``)."""
    config = base or Config()
    for section, values in raw.items():
        if section not in SECTION_TYPES:
            raise UserError(f"unknown config section [{section}]: valid sections are {', '.join(SECTION_TYPES)}")
        if not isinstance(values, dict):
            raise UserError(f"config section [{section}] must be a table of key = value lines")
        config = replace(config, **{section: _build_section(section, values, getattr(config, section))})
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    """Checks that involve more than one value."""
    from .data import DATASETS  # late import: data imports torch, config should stay light

    info = DATASETS[config.data.name]
    method = config.train.method
    from .training.methods import METHODS

    if method not in METHODS:
        raise UserError(f"train.method = {method!r} is not one of {', '.join(METHODS)}")
    if config.train.label_smoothing and "label_smoothing" not in METHODS[method].options:
        raise UserError(f"train.label_smoothing = {config.train.label_smoothing:g} applies to cross-entropy losses only;"
                        f" the {method} loss is not one: set it to 0 (in a compare config, set it under"
                        " [method.NAME.train] for the cross-entropy methods)")
    for loss in config.train.val_losses:
        if loss not in VAL_LOSSES:
            raise UserError(f"train.val_losses: {loss!r} is not one of {', '.join(VAL_LOSSES)}")
        if loss.startswith("proto_") and not METHODS[method].uses_prototypes:
            raise UserError(f"train.val_losses: {loss} attacks a prototype head, and {method} has none; in a compare"
                            " config, set it under [method.NAME.train] for the prototype methods")
    rule = METHODS[method].distance or config.prototypes.distance
    if METHODS[method].uses_prototypes and rule.startswith("dot_") and config.train.objective == "rule":
        raise UserError(f"prototypes.distance = {rule!r} is a decision rule with no loss of its own: set train.objective"
                        " to linf_distance or batch_cosine (the authors' code's two losses)")
    if config.train.objective != "rule" and not METHODS[method].uses_prototypes:
        raise UserError(f"train.objective = {config.train.objective!r} is a loss of prototype heads, and {method} has"
                        " none: leave it at \"rule\"")
    from .attacks.geometry import check_eps

    for section, key in (("train", "eps"), ("train", "alpha"), ("eval", "eps")):
        values = getattr(config, section)  # each radius in its own section's norm, bounded by the box's diameter
        check_eps(getattr(values, key), values.norm, math.prod(info.shape), what=f"{section}.{key}")
    if METHODS[method].uses_prototypes and config.prototypes.dim < info.num_classes:
        raise UserError(
            f"prototypes.dim = {config.prototypes.dim} is smaller than the {info.num_classes} classes of"
            f" {config.data.name}: use at least as many output dimensions as classes"
        )
    # Late import, as above; an unknown suite must fail before training, not after it.
    from .evaluation.suites import SUITES

    if config.eval.suite not in SUITES:
        raise UserError(f"eval.suite = {config.eval.suite!r} is not one of {', '.join(SUITES)}")
    from .data import configured_augmentation

    d = config.data
    augmented = configured_augmentation(d.name, d.augment, d.crop_padding)
    if d.flip != "random" and not augmented["flip"]:
        raise UserError(f"data.flip = {d.flip!r} has no flips to order: data.augment = {d.augment!r} does not mirror"
                        f" {d.name} images; set data.augment = \"crop_flip\" or leave data.flip at \"random\"")
    if d.padding != "zeros" and not augmented["crop_padding"]:
        raise UserError(f"data.padding = {d.padding!r} has no translations to pad: data.augment = {d.augment!r}"
                        f" with crop_padding {d.crop_padding} does not crop {d.name} images; set data.augment ="
                        " \"crop_flip\" and data.crop_padding >= 1, or leave data.padding at \"zeros\"")
    if d.padding == "reflect" and augmented["crop_padding"] >= min(info.shape[1:]):
        raise UserError(f"data.padding = 'reflect' needs data.crop_padding below the {min(info.shape[1:])}-pixel"
                        f" side of {d.name} images, got {augmented['crop_padding']}")
    directions = info.shape[0] * 4  # fast_cifar's 2x2 patches of C channels
    if config.model.whiten_directions > directions:
        raise UserError(f"model.whiten_directions = {config.model.whiten_directions} is more than the {directions}"
                        f" directions of a 2x2 patch of {config.data.name}: use 1-{directions}, or 0 for all")
    if config.model.name == "small_cnn" and min(info.shape[1:]) < 16:
        raise UserError(
            f"model.name = 'small_cnn' needs images of at least 16x16 pixels, but {config.data.name} images are"
            f" {info.shape[1]}x{info.shape[2]}: use model.name = \"mlp\" (or resnet18) for {config.data.name}"
        )
    if config.train.schedule == "cyclic" and config.train.lr_min > config.train.lr:
        raise UserError(f"train.lr_min = {config.train.lr_min:g} is above train.lr = {config.train.lr:g}")
    if config.train.schedule == "multistep" and any(m < 1 for m in config.train.milestones):
        raise UserError("train.milestones must be epochs >= 1")


def parse_override(text: str) -> tuple[str, str, object]:
    """Split ``"train.lr=0.05"`` into section, key and a TOML-typed value."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: write section.key=value, for example --set train.lr=0.05")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as cifar10 is a string
    return section, key, value


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """Parse a TOML file (data, never executed); absence or bad syntax is a ``UserError``."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder; give a .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} is not valid TOML: {error}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML config file (or start from defaults) and apply ``section.key=value`` overrides.

    Args:
        path: a TOML file, or None for the defaults.
        overrides: strings such as ``"train.lr=0.05"`` or ``"eval.eps=8/255"``.

    Returns:
        A validated, frozen ``Config``.
    """
    raw: dict = read_toml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each ``section.key=value`` of ``overrides`` in the nested dict ``raw`` (in place) and return it."""
    for text in overrides:
        section, key, value = parse_override(text)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise UserError(f"config section [{section}] must be a table")
        raw[section][key] = value
    return raw


# What a command that reads a trained run may change for itself: how it is evaluated and where
# its data lies, never what was trained.
RUN_OVERRIDABLE = {"eval": None, "data": ("data_dir", "test_dir")}


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    """A run's saved config with ``eval.*`` and data-folder overrides applied for one command."""
    for text in overrides:
        section, key, _ = parse_override(text)
        allowed = RUN_OVERRIDABLE.get(section, ())
        if allowed is not None and key not in allowed:
            raise UserError(f"--set {text}: a trained run's {section}.{key} cannot change; when reading a run only"
                            " eval.* and data.data_dir / data.test_dir can be set")
    return load_config(Path(run_dir) / CONFIG, overrides)


def resolve_paths(config: Config) -> Config:
    """The config with its folders and files made absolute, so a run resolves them from any folder."""
    def absolute(text: str) -> str:
        return str(Path(text).expanduser().resolve()) if text else text

    data = replace(config.data, data_dir=absolute(config.data.data_dir), test_dir=absolute(config.data.test_dir))
    prototypes = replace(config.prototypes, file=absolute(config.prototypes.file))
    return replace(config, data=data, prototypes=prototypes)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def to_toml(config: Config) -> str:
    """The resolved config as TOML text, saved beside every run."""
    return tomli_w.dumps(to_dict(config))
