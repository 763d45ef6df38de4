"""PNG pictures of a DiffResult (matplotlib, Agg backend: no display needed).

    plot_heatmap(result, "diff.png")        # layers × module groups, one panel per expert
    plot_layers(result, "layers.png")       # change per layer, one line per expert
"""

from __future__ import annotations

from pathlib import Path

GROUPS = ("attn", "mlp", "norm")
LABELS = {"relative": "relative change ‖Δ‖/‖W‖", "delta_norm": "‖Δ‖_F", "mean_abs": "mean |Δ|",
          "max_abs": "max |Δ|", "frac_changed": "share of entries changed"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _matrix(e, metric, layers):
    import numpy as np

    cols = list(GROUPS) + ["layer"]
    m = np.full((len(layers), len(cols)), np.nan)
    for r, i in enumerate(layers):
        g = e.layer_groups.get(i, {})
        for c, name in enumerate(GROUPS):
            if name in g:
                m[r, c] = g[name].value(metric)
        m[r, -1] = e.layers[i].value(metric)
    return m, cols


def plot_heatmap(result, path, metric: str = "relative") -> Path:
    """Layers (rows) × module groups (columns), one panel per expert, one shared colour scale."""
    import numpy as np

    plt = _plt()
    experts = list(result.experts.values())
    layers = sorted({i for e in experts for i in e.layers})
    mats = [_matrix(e, metric, layers)[0] for e in experts]
    cols = list(GROUPS) + ["whole layer"]
    vmax = max((np.nanmax(m) for m in mats if np.isfinite(m).any()), default=1.0) or 1.0
    height = max(3.0, 0.28 * len(layers) + 1.6)
    fig, axes = plt.subplots(1, len(experts), figsize=(2.6 * len(experts) + 1.4, height), squeeze=False,
                             sharey=True, constrained_layout=True)
    im = None
    for ax, e, m in zip(axes[0], experts, mats):
        im = ax.imshow(m, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(e.name, fontsize=11)
        ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=9)
        ax.axvline(len(GROUPS) - 0.5, color="white", lw=1.5)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=8 if len(layers) > 24 else 9)
        if len(layers) <= 16:
            for r in range(m.shape[0]):
                for c in range(m.shape[1]):
                    if np.isfinite(m[r, c]):
                        ax.text(c, r, f"{m[r, c]:.2g}", ha="center", va="center", fontsize=7,
                                color="black" if m[r, c] > 0.6 * vmax else "white")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label=LABELS.get(metric, metric))
    fig.suptitle(f"Change vs base by layer and module ({LABELS.get(metric, metric)})", fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_layers(result, path, metric: str = "relative") -> Path:
    """Per-layer change, one line per expert (and per-layer task-vector cosine between experts)."""
    plt = _plt()
    pairs = [(k, v) for k, v in result.pairs.items()]
    n_panels = 2 if pairs else 1
    fig, axes = plt.subplots(n_panels, 1, figsize=(7.5, 3.2 * n_panels + 0.4), squeeze=False, sharex=True,
                             constrained_layout=True)
    ax = axes[0][0]
    for e in result.experts.values():
        xs = sorted(e.layers)
        ax.plot(xs, [e.layers[i].value(metric) for i in xs], marker="o", ms=4, label=e.name)
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title("Change vs base per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_ylim(bottom=0)
    if pairs:
        ax2 = axes[1][0]
        for (a, b), p in pairs:
            xs = sorted(p["layers"])
            ax2.plot(xs, [p["layers"][i].cosine if p["layers"][i].cosine is not None else float("nan") for i in xs],
                     marker="o", ms=4, label=f"{a} vs {b}")
        ax2.axhline(0, color="grey", lw=0.8)
        ax2.set_ylabel("cosine of task vectors")
        ax2.set_title("Do the experts move the same way? (per layer)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=9)
    axes[-1][0].set_xlabel("layer")
    layers = sorted({i for e in result.experts.values() for i in e.layers})
    if layers and len(layers) <= 40:
        axes[-1][0].set_xticks(layers)
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
