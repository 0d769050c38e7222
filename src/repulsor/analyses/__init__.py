"""The paper's analyses as numbers: robustness curves (``curve``), adversarial confusion
(``confusion``), the overlap of two models' failures (``overlap``), nearest training neighbours
(``neighbours``), validation accuracy over epochs (``metrics``), embeddings and prototype
geometry (``embedding``); ``run`` runs them all on a run folder. Figures: ``repulsor.plots``.
"""

from .confusion import adversarial_confusion, confusion_matrix
from .curve import L2_EPS_VALUES, LINF_EPS_VALUES, curve_eps_values, default_eps_values, robustness_curve
from .embedding import embed_points, pca_2d, project_2d, prototype_cosines
from .metrics import epoch_summary, plot_metrics_over_epochs, read_metrics
from .neighbours import NeighbourGrid, draw_neighbours, find_neighbours, nearest_training_neighbours
from .overlap import compare_runs_overlap, confusion_agreement, misclassification_overlap
from .run import analyse_run, summary_lines
from .scores import class_scores

__all__ = ["L2_EPS_VALUES", "LINF_EPS_VALUES", "NeighbourGrid", "adversarial_confusion", "analyse_run", "class_scores",
           "compare_runs_overlap", "confusion_agreement", "confusion_matrix", "curve_eps_values", "default_eps_values",
           "draw_neighbours", "embed_points", "epoch_summary", "find_neighbours", "misclassification_overlap", "nearest_training_neighbours",
           "pca_2d", "plot_metrics_over_epochs", "project_2d", "prototype_cosines", "read_metrics",
           "robustness_curve", "summary_lines"]
