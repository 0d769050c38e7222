"""Model bodies, the registry that builds them, and the heads that make classifiers of them.

A body maps normalised images [N, C, H, W] to [N, out_dim]. ``build_model`` puts the
normalisation in front and, for prototype methods, the prototype head behind.
"""

from __future__ import annotations

from .build import (MODELS, build_body, build_for_method, build_model, fit_to_data, head_distance)
from .fast import FastCIFAR, fast_cifar
from .heads import DISTANCES, Network, Normalize, PrototypeClassifier
from .pcl import PCLClassifier
from .resnet import preact_resnet18, resnet18
from .small import mlp, small_cnn
from .wideresnet import wrn

__all__ = [
    "DISTANCES", "FastCIFAR", "MODELS", "Network", "Normalize", "PCLClassifier", "PrototypeClassifier", "build_body",
    "build_for_method", "build_model", "fast_cifar", "fit_to_data", "head_distance", "mlp", "preact_resnet18",
    "resnet18", "small_cnn", "wrn",
]
