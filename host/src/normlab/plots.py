"""PNG plots written into the run directory (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

# the attack evaluators' names, strongest first: the robust accuracy an SA-RA plot shows
ATTACKS = ("autoattack", "pgd", "apgd", "apgd_dlr", "fgsm", "mifgsm", "cw", "square")


def save(fig, path: Path) -> Path:
    """Lay out, write ``fig`` as a PNG at ``path`` (parents created), close it; return ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(history: list[dict], path: Path) -> Path | None:
    """Train loss and validation accuracy per epoch; None when there is nothing to draw."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [r["train_loss"] for r in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax2.plot(epochs, [r["train_acc"] for r in history], marker="o", label="train")
    ax2.plot(epochs, [r["val_acc"] for r in history], marker="o", label="val")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    ax2.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save(fig, path)


def _gflops(m: dict, point: str = "") -> str:
    """" (N GFLOPs)" for a run or a sweep point whose width has FLOPs recorded (the slim plugin), else ""."""
    widths = [k.split("/")[1] for k in m if k.startswith("slim/width=") and k.endswith("/flops")]
    width = next((p for p in point.split(",") if p.startswith("width=")), None)
    if width is None and len(widths) == 1:
        width = widths[0]
    key = f"slim/{width}/flops"
    return f" ({m[key] / 1e9:.3g} GFLOPs)" if width and key in m else ""


def sara_plot(runs: dict[str, dict], path: Path) -> Path | None:
    """SA-RA plane: a point per run with clean and attack accuracy, a curve per sweep (per group of a grid's
    later knobs: one per width), labelled with the FLOPs of a forward where the run records them. None if
    nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    plotted = False
    for name, results in runs.items():
        m = results["metrics"]
        attack = next((a for a in ATTACKS if f"{a}/acc" in m), None)
        if "clean/acc" in m and attack:
            ax.scatter(m["clean/acc"], m[f"{attack}/acc"], marker="s", zorder=3)
            ax.annotate(name + _gflops(m), (m["clean/acc"], m[f"{attack}/acc"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)
            plotted = True
        values = list(dict.fromkeys(k.split("/")[1] for k in m if k.startswith("sweep/")))
        points = [(v, m.get(f"sweep/{v}/clean/acc"), next((m[f"sweep/{v}/{a}/acc"] for a in ATTACKS
                                                          if f"sweep/{v}/{a}/acc" in m), None)) for v in values]
        points = [p for p in points if p[1] is not None and p[2] is not None]
        groups = list(dict.fromkeys(",".join(v.split(",")[1:]) for v, _, _ in points))
        for group in groups:
            part = [p for p in points if ",".join(p[0].split(",")[1:]) == group]
            label = f"{name} (sweep{' ' + group if group else ''}){_gflops(m, group)}"
            ax.plot([p[1] for p in part], [p[2] for p in part], marker="o", label=label)
            for v, sa, ra in part:
                ax.annotate(v.split(",")[0], (sa, ra), textcoords="offset points", xytext=(4, 4), fontsize=7)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set(xlabel="standard accuracy (clean/acc)", ylabel="robust accuracy (attack/acc)", title="SA-RA")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save(fig, path)
