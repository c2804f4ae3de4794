"""Figures in a notebook and the ipywidgets explorers that redraw them (JupyterLab)."""
from __future__ import annotations

from typing import Optional

from ..evaluate import series_name
from .embeddings import embeddings
from .params import LabSettings
from .tables import confusion_of, results_frame


def show(fig, name: str, out: Optional[str] = None) -> None:
    """Save ``fig`` (a Figure, or Axes drawn into one) as outputs/figures/<name>.png and .pdf,
    display it once, and close it."""
    from ..plots import save_figure
    fig = getattr(fig, "figure", fig)
    save_figure(fig, name, out)
    try:
        from IPython.display import display
        display(fig)
    except ImportError:  # plain Python: the files are the output
        pass
    import matplotlib.pyplot as plt
    plt.close(fig)


# ---------------------------------------------------------------- widgets (JupyterLab)

# The explorers redraw into an Image widget (and an HTML widget for tables) instead of
# capturing output in an Output widget: Output-widget capture can leave papermill/nbclient
# waiting forever for a cell to finish (nteract/papermill#723), and batch runs must not hang.

def _explorer(draw, controls: dict):
    """``controls`` above a table and a figure that ``draw(**values)`` refills on every change.
    ``draw`` returns a Figure, ``(html, Figure)`` or None (nothing to show)."""
    import ipywidgets as widgets
    html, image = widgets.HTML(), widgets.Image(format="png")

    def update(change=None):
        result = draw(**{name: control.value for name, control in controls.items()})
        table, fig = result if isinstance(result, tuple) else ("", result)
        html.value = table
        image.value = _png(fig) if fig is not None else b""
        image.layout.display = None if fig is not None else "none"

    for control in controls.values():
        control.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox(list(controls.values())), html, image])


def _png(fig, dpi: int = 90) -> bytes:
    """A figure as PNG bytes; the figure is closed so the inline backend does not show it again."""
    import io

    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def confusion_explorer(table):
    """Pick a method (and protocol) and a seed-summed confusion matrix and per-class bars redraw."""
    import ipywidgets as widgets

    from .. import plots
    series = list(dict.fromkeys((r["method"], r["protocol"]) for r in table.rows))
    classes = table.rows[0]["classes"]
    choice = widgets.Dropdown(options=[(series_name(m, p), (m, p)) for m, p in series], description="method")

    def draw(pick):
        method, protocol = pick
        rows = [r for r in table.rows if (r["method"], r["protocol"]) == (method, protocol)]
        return plots.confusion(confusion_of(table, method, protocol), classes, f"{series_name(method, protocol)}: "
                               f"{rows[0]['budget']} labels/class, {len(rows)} seed(s)")
    return _explorer(draw, {"pick": choice})


def curve_explorer(table):
    """Metric, protocols and methods to show; the label curves redraw from the computed table."""
    import ipywidgets as widgets

    from .. import plots
    protocols = list(dict.fromkeys(r["protocol"] for r in table.rows))
    methods = list(dict.fromkeys(r["method"] for r in table.rows if r["protocol"] != "scratch"))
    controls = {
        "metric": widgets.ToggleButtons(options=[("top-1", "top1"), ("top-5", "top5")], description="metric"),
        "protocols": widgets.SelectMultiple(options=protocols, value=tuple(protocols), description="protocol"),
        "methods": widgets.SelectMultiple(options=methods, value=tuple(methods), description="method"),
    }

    def draw(metric, protocols, methods):
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.2))
        plots.plot_label_curves(table, metric, ax, protocols=set(protocols), methods=set(methods))
        return fig
    return _explorer(draw, controls)


def budget_explorer(table):
    """A budget slider: the table and accuracy bars of that budget."""
    import ipywidgets as widgets

    from .. import plots
    budgets = sorted({r["budget"] for r in table.rows})
    slider = widgets.SelectionSlider(options=budgets, value=budgets[0], description="labels/class")

    def draw(budget):
        return (results_frame(table, budget).to_html(index=False),
                plots.accuracy_bars([r for r in table.rows if r["budget"] == budget],
                                    title=f"{budget} labeled images per class"))
    return _explorer(draw, {"budget": slider})


def umap_explorer(runs: dict, settings: LabSettings, panels: list):
    """Pick the layer (computed on first use, then kept) and which panels to show."""
    import ipywidgets as widgets

    from .. import plots
    cache = {settings.resolved_layer: panels}
    classes = settings.splits.test.classes
    layer = widgets.Dropdown(options=list(settings.layers), value=settings.resolved_layer, description="layer")
    names = [e.name for e in panels]
    shown = widgets.SelectMultiple(options=names, value=tuple(names), description="panels")

    def draw(layer, shown):
        if layer not in cache:
            cache[layer] = embeddings(runs, settings, layer)
        chosen = [e for e in cache[layer] if e.name in shown]
        return plots.umap_panels(chosen, classes) if chosen else None
    return _explorer(draw, {"layer": layer, "shown": shown})

