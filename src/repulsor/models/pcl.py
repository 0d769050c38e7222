"""The prototype conformity loss model (Mustafa et al., ICCV 2019): a softmax classifier whose
hidden spaces are shaped around learned class centres.

``PCLClassifier`` wraps a plain ``Network``. Its scores are the network's logits, so it
classifies (and is attacked) exactly like a cross-entropy model. For training it also exposes
the features of several layers, each with its own learned centres [k, d]:

- the penultimate features (the input of the body's last linear layer), and
- auxiliary projections of earlier layers: global average pooling of a stage's output (for
  convolutional stages) followed by a linear map, Mustafa et al.'s small auxiliary networks.

The auxiliary projections and centres only shape training; ``repulsor export`` drops them and
writes the inner ``Network``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .heads import Network


def feature_taps(body: nn.Module) -> tuple[list[nn.Module], nn.Linear]:
    """The earlier layers whose outputs get auxiliary projections, and the last linear layer.

    ResNets and WRNs: every stage but the last (their last stage feeds the pooled penultimate
    features); fast_cifar likewise, every conv group but the last. Small CNN: the first pooling block and the first hidden layer. MLP: the first
    hidden layer.
    """
    stages = getattr(body, "stages", None)
    if isinstance(stages, nn.Sequential) and isinstance(getattr(body, "fc", None), nn.Linear):
        return list(stages)[:-1], body.fc
    groups = getattr(body, "groups", None)  # fast_cifar: every conv group but the last, as the ResNets
    if isinstance(groups, nn.Sequential) and isinstance(getattr(body, "linear", None), nn.Linear):
        return list(groups)[:-1], body.linear
    features = getattr(body, "features", None)
    if isinstance(features, nn.Sequential) and isinstance(getattr(body, "fc3", None), nn.Linear):
        return [features[2], body.fc1], body.fc3
    if isinstance(getattr(body, "fc3", None), nn.Linear):
        return [body.fc1], body.fc3
    raise UserError(f"pcl: no feature taps known for a {type(body).__name__} body; use resnet18, "
                    "preact_resnet18, wrn, small_cnn, mlp or fast_cifar")


class PCLClassifier(nn.Module):
    """A ``Network`` plus auxiliary projections and learned class centres in each hidden space.

    Args:
        network: a ``Network`` with a linear head ([0, 1] images -> k logits).
        num_classes: k.
        input_shape: (C, H, W) of the images, used once to find the tapped layers' sizes.
        aux_dim: output size of each auxiliary projection (capped at the tapped layer's width).

    ``forward(x)`` returns logits [N, k]. ``forward(x, return_features=True)`` returns
    ``(logits, features)`` with ``features`` a list of [N, d_s] tensors, penultimate first;
    ``centres[s]`` is the [k, d_s] parameter of space s.
    """

    def __init__(self, network: Network, num_classes: int, input_shape, aux_dim: int = 64):
        super().__init__()
        if not isinstance(network, Network):
            raise UserError(f"pcl needs a Network with a linear head, got {type(network).__name__}")
        self.network = network
        taps, last = feature_taps(network.body)
        self._captured: list | None = None
        for tap in taps:
            tap.register_forward_hook(self._keep_output)
        last.register_forward_pre_hook(self._keep_input)

        # One dry run in eval mode (batch-norm statistics untouched) gives the tapped sizes.
        was_training = network.training
        network.eval()
        self._captured = []
        with torch.no_grad():
            network(torch.zeros(1, *input_shape))
        widths = [t.shape[1] for t in self._captured]
        self._captured = None
        network.train(was_training)
        penultimate, tapped = widths[-1], widths[:-1]
        self.aux = nn.ModuleList(nn.Linear(c, min(c, aux_dim)) for c in tapped)
        dims = [penultimate] + [min(c, aux_dim) for c in tapped]
        generator = torch.Generator().manual_seed(0)
        # Centres start as small random points; training moves them (they are parameters).
        self.centres = nn.ParameterList(nn.Parameter(0.1 * torch.randn(num_classes, d, generator=generator))
                                        for d in dims)

    def _keep_output(self, module, inputs, output):
        if self._captured is not None:
            self._captured.append(output)

    def _keep_input(self, module, inputs):
        if self._captured is not None:
            self._captured.append(inputs[0])

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if not return_features:
            return self.network(x)
        self._captured = []
        try:
            logits = self.network(x)
            captured = self._captured
        finally:
            self._captured = None
        *earlier, penultimate = captured
        features = [penultimate]
        for h, project in zip(earlier, self.aux):
            pooled = h.mean(dim=(2, 3)) if h.dim() == 4 else h
            features.append(project(pooled))
        return logits, features

    def extra_repr(self) -> str:
        return "spaces=" + ", ".join(str(c.shape[1]) for c in self.centres)
