"""repulsor: deep repulsive prototypes for adversarial robustness, and an evaluation a defence cannot fool.

The Python API:

- ``load_dataset(name, split, data_dir=...) -> (x, y)``: images [N, C, H, W] in [0, 1], labels [N].
- ``load_model(run_dir) -> nn.Module``: a trained run's model, [0, 1] images -> class scores.
- ``evaluate(model, x, y, suite=...) -> dict``: clean accuracy and a worst-case attack cascade.
- ``bpda(step, backward=None) -> nn.Module``: a non-differentiable step that gradient attacks see through.
- ``generate_prototypes(k, D, ...) -> Tensor [k, D]``: repulsive prototypes (Eq. 5).
- ``train(config, out_dir)``: the training loop; ``load_config(path, overrides)`` reads a config.
"""

from .version import __version__  # noqa: F401 - repulsor.__version__

from .attacks import bpda
from .config import load_config
from .data import load_dataset
from .errors import UserError
from .evaluation.cascade import evaluate
from .prototypes import generate_prototypes
from .store.run import load_model
from .training.loop import train

__all__ = ["UserError", "bpda", "evaluate", "generate_prototypes", "load_config", "load_dataset", "load_model", "train"]
