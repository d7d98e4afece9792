"""PNG figures for evaluation reports and model cards.

Each function draws on its own Agg-backed Figure: no pyplot state, no display needed, and
importing this module does not touch matplotlib's global backend.
"""

from __future__ import annotations

from pathlib import Path

DPI = 120


def _figure(width: float, height: float, **subplots):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots)


def _short(title: str, width: int = 48) -> str:
    return title if len(title) <= width else "..." + title[-(width - 3):]


def plot_confusion(confusion: dict, path: Path, title: str = "") -> Path:
    """Counts, and each row's share of its gold class, in an N x N grid; darker is more rows."""
    import numpy as np

    matrix = np.asarray(confusion["matrix"])
    labels = confusion["labels"]
    side = max(4.0, 0.7 * len(labels) + 2)
    fig, ax = _figure(side + 0.6, side)
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, matrix.max()))
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for (g, p), count in np.ndenumerate(matrix):
        dark = count > matrix.max() / 2
        ax.text(p, g, f"{count}\n{shares[g, p]:.1%}" + (" of gold" if len(labels) <= 3 else ""), ha="center",
                va="center", fontsize=11 if len(labels) <= 4 else 7, color="white" if dark else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0, ha="right" if len(labels) > 4
                  else "center")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"Confusion matrix\n{_short(title)}", fontsize=10)
    fig.savefig(path)
    return Path(path)


def plot_reliability(calibration: dict, path: Path, title: str = "") -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with the row count below."""
    bins = calibration["bins"]
    fig, (ax, hist) = _figure(5.2, 5.2, nrows=2, sharex=True, height_ratios=[3, 1])
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"]
    filled = [(c, b) for c, b in zip(centers, bins) if b["count"]]
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    xs = [c for c, _ in filled]
    acc, conf = [b["accuracy"] for _, b in filled], [b["confidence"] for _, b in filled]
    ax.bar(xs, acc, width=width * 0.9, color="tab:blue", alpha=0.8, edgecolor="black", label="accuracy")
    ax.vlines(xs, acc, conf, color="tab:red", lw=2)
    ax.plot(xs, conf, "D", color="tab:red", label="mean confidence (red line: gap)")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Reliability diagram, ECE {calibration['ece']:.3f}, Brier {calibration['brier']:.3f}\n"
                 f"{_short(title)}", fontsize=10)
    hist.bar(centers, [b["count"] for b in bins], width=width * 0.95, color="gray")
    hist.set_xlim(0, 1)
    hist.set_xlabel("confidence (probability of the predicted label)")
    hist.set_ylabel("rows")
    fig.savefig(path)
    return Path(path)


def plot_accuracy_by_length(by_length: dict, overall: float, path: Path, title: str = "") -> Path:
    """Accuracy per length bucket with its 95% interval; empty buckets are left out."""
    buckets = [b for b in by_length["buckets"] if b["count"]]
    fig, ax = _figure(5.6, 3.8)
    x = range(len(buckets))
    acc = [b["accuracy"] for b in buckets]
    err = [[a - b["ci95"][0] for a, b in zip(acc, buckets)], [b["ci95"][1] - a for a, b in zip(acc, buckets)]]
    ax.bar(x, acc, yerr=err, capsize=4, color="tab:blue", edgecolor="black")
    ax.axhline(overall, ls="--", color="gray", label=f"overall accuracy {overall:.3f}")
    ax.set_xticks(list(x), [f"{b['words']}\nn={b['count']}" for b in buckets])
    ax.set_ylim(0, 1.15)
    ax.set_xlabel(f"length in {by_length['unit']}")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"Accuracy by length (bars: 95% CI)\n{_short(title)}", fontsize=10)
    fig.savefig(path)
    return Path(path)


def plot_per_label(per_label: dict, path: Path, title: str = "") -> Path:
    """Multi-label: F1 per label, with its support under the name."""
    names = list(per_label)
    fig, ax = _figure(max(5.0, 0.5 * len(names) + 2), 3.8)
    ax.bar(range(len(names)), [per_label[n]["f1"] for n in names], color="tab:blue", edgecolor="black")
    ax.set_xticks(range(len(names)), [f"{n}\nn={per_label[n]['support']}" for n in names], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title(f"F1 per label\n{_short(title)}", fontsize=10)
    fig.savefig(path)
    return Path(path)


def plot_scatter(report: dict, path: Path, title: str = "") -> Path:
    """Regression: a regression report's predicted against gold values, with the diagonal and the correlations."""
    points = report["points"]
    fig, ax = _figure(4.8, 4.4)
    ax.scatter(points["gold"], points["predicted"], s=8, alpha=0.5)
    lo, hi = report["gold_range"]
    ax.plot([lo, hi], [lo, hi], "--", color="gray", label="predicted = gold")
    ax.set_xlabel("gold")
    ax.set_ylabel("predicted")
    ax.legend(fontsize=8)
    ax.set_title(f"Pearson {report['pearson']:.3f}, Spearman {report['spearman']:.3f}\n{_short(title)}",
                 fontsize=10)
    fig.savefig(path)
    return Path(path)


def plot_training_curves(history: list, path: Path, title: str = "", metric: str = "accuracy") -> Path:
    """Training and validation loss, and the validation metric, per epoch (from metrics.json's `epochs`)."""
    from raysst.task import best_row

    epochs = [row["epoch"] for row in history]
    fig, (loss, acc) = _figure(8.0, 3.6, ncols=2)
    loss.plot(epochs, [row["train_loss"] for row in history], "o-", label="training loss")
    loss.plot(epochs, [row["eval_loss"] for row in history], "s-", label="validation loss")
    loss.set_xlabel("epoch")
    loss.set_ylabel("loss")
    loss.legend(fontsize=8)
    acc.plot(epochs, [row[metric] for row in history], "o-", color="tab:green")
    best = best_row(history, metric)  # the epoch export_run keeps
    acc.plot([best["epoch"]], [best[metric]], "*", ms=14, color="tab:orange",
             label=f"best, exported: epoch {best['epoch']}")
    acc.legend(fontsize=8)
    acc.set_xlabel("epoch")
    acc.set_ylabel(f"validation {metric}")
    for ax in (loss, acc):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Training curves: {_short(title, 60)}", fontsize=10)
    fig.savefig(path)
    return Path(path)
