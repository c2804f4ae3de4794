"""What the notebooks call: ``from sslab import lab, plots`` and one ``lab.…`` call per cell.

- :mod:`.params`: the parameters cell's checks (:func:`check_notebook_params`) and the
  :class:`LabSettings` every notebook derives its pretraining configs from, and the YAML
  parameter files (:func:`load_params`);
- :mod:`.runs`: the dataset, the pretrained runs, what each pretext task learned;
- :mod:`.tables`: the sweeps as tables and one-sentence readings;
- :mod:`.choosing`: which images to label — the selection sweep, the picks, their tables;
- :mod:`.embeddings`: UMAP panels;  :mod:`.widgets`: figures and ipywidgets explorers;
- :mod:`.teaching`: the checks under each notebook's method page (the page's plain PyTorch against
  the library on the same batch), and notebook 00's comparison with the lab;
- :mod:`.notebooks`: ``python -m sslab.lab`` (``make lab``): run, time and publish the notebooks.
"""
from ..evaluate import series_name
from .choosing import (selection_frame, selection_gain_frame, selection_picks, selection_sentence, selection_sweep,
                       validation_worth)
from ..evaluate.selection import kmeans
from .embeddings import embeddings, separation_sentence
from .notebooks import NOTEBOOKS, TABLES, headline, main, publish, published_notebook, execute_notebooks
from .params import CHECKS, SCORES, LabSettings, check_notebook_params, load_params
from .runs import (dataset_summary, pretext_sentence, pretrain_runs, rotation_accuracy_by_class, rotation_predictions,
                   rotation_sentence, setting_sweep, simclr_views, sweep_configs, vae_reconstructions, vae_sentence)
from .tables import (best_series, confusion_of, confusion_sentence, curve_sentence, evaluate_budgets, finetune_sentence,
                     gain_frame, pivot_frame, probe_sentence, references, results_frame, semi_sentence, sweep_sentence)
from .teaching import (Handover, agree, agree_states, agreement, agreement_frame, agreement_sentence,
                       check_finetune_step, check_fixmatch_mask, check_pretext_loss, check_probe_step,
                       check_propagation, check_selection, check_typical, handover, labeled_images,
                       library_pretext_loss, selection_points)
from .widgets import budget_explorer, confusion_explorer, curve_explorer, show, umap_explorer

__all__ = ["agree", "agree_states", "agreement", "agreement_frame", "agreement_sentence", "best_series",
           "budget_explorer", "check_finetune_step", "check_fixmatch_mask", "check_notebook_params",
           "check_pretext_loss", "check_probe_step", "check_propagation", "check_selection", "check_typical",
           "CHECKS", "confusion_explorer", "confusion_of", "confusion_sentence", "curve_explorer", "curve_sentence",
           "dataset_summary", "embeddings", "evaluate_budgets", "finetune_sentence", "gain_frame", "handover",
           "Handover", "headline", "kmeans", "labeled_images", "LabSettings", "library_pretext_loss", "load_params",
           "main", "NOTEBOOKS", "pivot_frame", "pretext_sentence", "pretrain_runs", "probe_sentence", "publish",
           "published_notebook", "references", "results_frame", "rotation_accuracy_by_class", "rotation_predictions",
           "rotation_sentence", "execute_notebooks", "SCORES", "selection_frame", "selection_gain_frame",
           "selection_picks", "selection_points", "selection_sentence", "selection_sweep", "semi_sentence",
           "separation_sentence", "series_name", "setting_sweep", "show", "simclr_views", "sweep_configs",
           "sweep_sentence", "TABLES", "umap_explorer", "vae_reconstructions", "vae_sentence", "validation_worth"]
