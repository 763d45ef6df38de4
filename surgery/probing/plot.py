"""One PNG for a ProbeResult: a panel per analysis, a line per model (and language or pair), overlaid."""

from __future__ import annotations

from pathlib import Path

_STYLES = ("-", "--", ":", "-.")


def plot_probe(result, path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result.models.values())
    panels = [p for p, have in (("probing", any(m.probing for m in models)),
                                ("alignment", any(m.alignment for m in models)),
                                ("retrieval", any(m.alignment for m in models)),
                                ("lape", any(m.lape for m in models))) if have]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        for n, m in enumerate(models):
            style = _STYLES[n % len(_STYLES)]
            tag = f"{m.name}: " if len(models) > 1 else ""
            if panel == "probing" and m.probing:
                ax.plot(m.layers, m.probing.accuracy, style, marker=".", color=colours[n % len(colours)],
                        label=f"{m.name}")
                ax.axhline(m.probing.chance, color="grey", lw=0.8, ls=":")
            for c, (pair, per) in enumerate(m.alignment.items()):
                colour = colours[c % len(colours)]
                if panel == "alignment":
                    ax.plot(m.layers, [a.pair_cosine for a in per], style, color=colour, label=f"{tag}{pair} pairs")
                    ax.plot(m.layers, [a.random_cosine for a in per], style, color=colour, alpha=0.4,
                            label=f"{tag}{pair} random")
                elif panel == "retrieval":
                    ax.plot(m.layers, [(a.retrieval + a.retrieval_back) / 2 for a in per], style, marker=".",
                            color=colour, label=f"{tag}{pair}")
            if panel == "lape" and m.lape:
                for c, (lang, counts) in enumerate(m.lape.counts().items()):
                    ax.plot(m.layers, counts, style, marker=".", color=colours[c % len(colours)],
                            label=f"{tag}{lang}")
        title, ylabel = {"probing": ("Linear probe (cross-validated)", "accuracy"),
                         "alignment": ("Cosine of mean-pooled states", "cosine"),
                         "retrieval": ("Translation retrieval", "accuracy"),
                         "lape": ("Language-specific neurons (LAPE)", "neurons")}[panel]
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]
