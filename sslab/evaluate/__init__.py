"""Measuring what pretraining buys: each evaluation protocol in a file of its own, on shared
pieces (metrics, frozen features, heads, the cells of the run store), and label-budget curves.

Every evaluation cell (method × protocol × budget × seed) is a run in the store
(``outputs/runs/eval-…``: config, metrics, split indices), found again by its config, so a
sweep run twice only computes what is missing. For one budget and seed every method sees
the same labeled and validation images (:func:`sslab.data.label_budget_split`).

- :mod:`.probe`: a head (mlp, linear, knn) on frozen features; :mod:`.batched_heads` trains a
  sweep's heads together.
- :mod:`.end_to_end`: the scratch baseline and fine-tuning.
- :mod:`.labelprop`, :mod:`.selftrain`, :mod:`.fixmatch`: the protocols that put the unlabeled
  pool to work when the classifier trains.
- :mod:`.curve`: label-budget sweeps; :mod:`.table`: their results.
"""
from .cells import EvalConfig, check_budgets, check_seeds, pretrained_id
from .curve import (BUDGETS, PROTOCOLS, check_protocols, compute_cell, curve_cells, default_table_name, label_curve,
                    merge_curve)
from .end_to_end import finetune_cell, scratch_cell
from .features import dataset_splits, cached_features
from .fixmatch import fixmatch_cell
from .labelprop import labelprop_cell
from .selftrain import selftrain_cell
from .heads import HEADS, FeatureHead, ImageClassifier, predict
from .metrics import classification_metrics, confusion_matrix, topk_accuracy
from .probe import probe_cell, probe_cells_together
from .table import ResultTable, series_name, series_order


__all__ = ["BUDGETS", "check_budgets", "check_protocols", "check_seeds", "classification_metrics",
           "compute_cell", "confusion_matrix", "curve_cells", "dataset_splits", "default_table_name", "EvalConfig",
           "FeatureHead", "finetune_cell", "fixmatch_cell", "HEADS", "ImageClassifier",
           "label_curve", "labelprop_cell", "merge_curve", "predict", "pretrained_id", "probe_cell",
           "probe_cells_together", "PROTOCOLS", "ResultTable", "cached_features", "scratch_cell", "selftrain_cell",
           "series_name", "series_order", "topk_accuracy"]
