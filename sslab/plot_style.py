"""What every figure shares: matplotlib, imported only when a figure is drawn (``python -m sslab
curve`` runs where it is missing), and one colour per method in every figure."""
from __future__ import annotations

METHOD_COLORS = {"rotation": "#1f77b4", "vae": "#ff7f0e", "siamese-vae": "#2ca02c", "simclr": "#d62728",
                 "random-init": "#8c8c8c", "scratch": "#555555"}
# Methods without a colour of their own take these in turn (by their index in the figure).
FALLBACK_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def pyplot():
    """``matplotlib.pyplot``, imported on first use."""
    import matplotlib.pyplot as plt
    return plt


def method_color(method: str, fallback_index: int = 0) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return FALLBACK_COLORS[fallback_index % len(FALLBACK_COLORS)]
