"""PNG pictures of a DiffResult (matplotlib, Agg backend: no display needed).

    plot_heatmap(result, "diff.png")        # (embeddings, layers, final norm, lm_head) × module groups
    plot_layers(result, "layers.png")       # change per layer, one line per expert, outer tensors beside
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


OUTER_BEFORE = ("embed",)             # rows above layer 0
OUTER_AFTER = ("norm", "lm_head")     # rows below the last layer (the final norm, the output head)
OUTER_LABELS = {"embed": "embeddings", "norm": "final norm", "lm_head": "lm_head", "other": "other (outside layers)"}
TICK_LABELS = {"embed": "embed", "norm": "final\nnorm", "lm_head": "lm\nhead"}


def heatmap_data(result, metric: str = "relative"):
    """What ``plot_heatmap`` draws: row labels, column labels, and per expert the values and the colours.

    Rows: the embeddings, every layer, the final norm and lm_head (those present). Columns: attn,
    mlp, norm and the whole layer (a tensor outside layers has its value there). Colours are scaled
    per column, over all experts, so an outlier in one column (a layer-0 norm) cannot flatten the
    others; the outer rows are scaled among themselves. Cells hold the real values.
    """
    import numpy as np

    experts = list(result.experts.values())
    layers = sorted({i for e in experts for i in e.layers})
    outer = {g for e in experts for g in e.outer}
    before = [g for g in OUTER_BEFORE if g in outer]
    after = [g for g in OUTER_AFTER if g in outer] + (["other"] if "other" in outer else [])
    rows = [("outer", g) for g in before] + [("layer", i) for i in layers] + [("outer", g) for g in after]
    cols = list(GROUPS) + ["whole layer"]
    values = []
    for e in experts:
        m = np.full((len(rows), len(cols)), np.nan)
        for r, (kind, key) in enumerate(rows):
            if kind == "outer":
                if key in e.outer:
                    m[r, -1] = e.outer[key].value(metric)
                continue
            g = e.layer_groups.get(key, {})
            for c, name in enumerate(GROUPS):
                if name in g:
                    m[r, c] = g[name].value(metric)
            if key in e.layers:
                m[r, -1] = e.layers[key].value(metric)
        values.append(m)
    is_layer = np.array([kind == "layer" for kind, _ in rows])
    colours = [np.full_like(m, np.nan) for m in values]
    stacked = np.stack(values) if values else np.zeros((0, len(rows), len(cols)))
    for part in (is_layer, ~is_layer):
        for c in range(len(cols)):
            block = stacked[:, part, c]
            top = np.nanmax(block) if np.isfinite(block).any() else np.nan
            for m, col in zip(values, colours):
                col[part, c] = m[part, c] / top if np.isfinite(top) and top > 0 else np.where(
                    np.isfinite(m[part, c]), 0.0, np.nan)
    labels = [OUTER_LABELS.get(key, key) if kind == "outer" else str(key) for kind, key in rows]
    return labels, cols, values, colours


def plot_heatmap(result, path, metric: str = "relative") -> Path:
    """Rows (embeddings, layers, final norm, lm_head) × module groups, one panel per expert; colours
    scaled per column (see ``heatmap_data``), the values written in the cells."""
    import numpy as np

    plt = _plt()
    experts = list(result.experts.values())
    labels, cols, values, colours = heatmap_data(result, metric)
    height = max(3.0, 0.28 * len(labels) + 1.6)
    fig, axes = plt.subplots(1, len(experts), figsize=(2.6 * len(experts) + 1.8, height), squeeze=False,
                             sharey=True, constrained_layout=True)
    im = None
    n_before = next((i for i, lab in enumerate(labels) if lab.isdigit()), 0)
    n_layers = sum(lab.isdigit() for lab in labels)
    for ax, e, m, col in zip(axes[0], experts, values, colours):
        im = ax.imshow(col, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(e.name, fontsize=11)
        ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=9)
        ax.axvline(len(GROUPS) - 0.5, color="white", lw=1.5)
        for edge in (n_before - 0.5, n_before + n_layers - 0.5):
            if 0 < edge + 0.5 < len(labels):
                ax.axhline(edge, color="white", lw=1.5)
        ax.set_yticks(range(len(labels)), labels, fontsize=8 if len(labels) > 24 else 9)
        if len(labels) <= 40:
            for r in range(m.shape[0]):
                for c in range(m.shape[1]):
                    if np.isfinite(m[r, c]):
                        ax.text(c, r, f"{m[r, c]:.2g}", ha="center", va="center", fontsize=7,
                                color="black" if col[r, c] > 0.6 else "white")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="share of the column's largest value")
    fig.suptitle(f"Change vs base by layer and module\n({LABELS.get(metric, metric)})", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def outer_positions(result, layers) -> dict:
    """x positions of the tensors outside layers in the line plot: embeddings left of layer 0, the final
    norm and lm_head right of the last layer."""
    present = {g for e in result.experts.values() for g in e.outer}
    first, last = (layers[0], layers[-1]) if layers else (0, -1)
    out = {g: first - 2 - k for k, g in enumerate(g for g in OUTER_BEFORE if g in present)}
    out.update({g: last + 2 + k for k, g in enumerate(g for g in OUTER_AFTER if g in present)})
    return out


def plot_layers(result, path, metric: str = "relative") -> Path:
    """Per-layer change, one line per expert (and per-layer task-vector cosine between experts)."""
    plt = _plt()
    pairs = [(k, v) for k, v in result.pairs.items()]
    n_panels = 2 if pairs else 1
    fig, axes = plt.subplots(n_panels, 1, figsize=(7.5, 3.2 * n_panels + 0.4), squeeze=False, sharex=True,
                             constrained_layout=True)
    ax = axes[0][0]
    layers = sorted({i for e in result.experts.values() for i in e.layers})
    positions = outer_positions(result, layers)
    shown = []
    for e in result.experts.values():
        xs = sorted(e.layers)
        ys = [e.layers[i].value(metric) for i in xs]
        line, = ax.plot(xs, ys, marker="o", ms=4, label=e.name)
        outer = [(x, e.outer[g].value(metric)) for g, x in positions.items() if g in e.outer]
        if outer:
            ax.plot(*zip(*outer), linestyle="none", marker="D", ms=6, color=line.get_color())
        shown += ys + [v for _, v in outer]
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title("Change vs base per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    positive = [v for v in shown if v > 0]
    if positive and max(positive) > 30 * sorted(positive)[len(positive) // 2]:
        ax.set_yscale("log")  # an outlier (often the embeddings) would flatten the layers
    else:
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
    ticks = [(i, str(i)) for i in layers] if len(layers) <= 40 else []
    ticks += [(x, TICK_LABELS[g]) for g, x in positions.items()]
    if ticks:
        axes[-1][0].set_xticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
