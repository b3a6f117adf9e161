"""Reports people read and look at: per-class metrics, confused pairs, a confusion matrix, training curves."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lit_lora.files import atomic_write, write_text


def per_class_metrics(confusion: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows: true, columns: predicted)."""
    rows = []
    for i, name in enumerate(class_names):
        tp = float(confusion[i, i])
        predicted, support = float(confusion[:, i].sum()), float(confusion[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(support)})
    return rows


def confused_pairs(confusion: np.ndarray, class_names: list[str], top: int = 10) -> list[tuple[str, str, int, float]]:
    """The most frequent mistakes: (true class, predicted class, count, share of the true class's images)."""
    off = confusion.astype(float).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1]
    pairs = []
    for flat in order[:top]:
        i, j = divmod(int(flat), off.shape[1])
        if off[i, j] <= 0:
            break
        pairs.append((class_names[i], class_names[j], int(off[i, j]), off[i, j] / max(confusion[i].sum(), 1)))
    return pairs


def cluster_order(confusion: np.ndarray) -> np.ndarray:
    """An order of the classes that puts classes confused with each other next to each other.

    Spectral ordering: sort by the Fiedler vector of the graph whose edges are the (symmetrised, row-normalised)
    confusions. Plain numpy, and on 101 classes it turns scattered off-diagonal cells into blocks.
    """
    n = confusion.shape[0]
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    affinity = rates + rates.T
    np.fill_diagonal(affinity, 0)
    if n < 3 or not affinity.any():
        return np.arange(n)
    # A faint link between every pair keeps the graph connected, so the Fiedler vector orders the groups too.
    affinity = affinity + 1e-3 * affinity.max() * (1 - np.eye(n))
    laplacian = np.diag(affinity.sum(axis=1)) - affinity
    _, vectors = np.linalg.eigh(laplacian)
    return np.argsort(vectors[:, 1], kind="stable")


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix as a PNG, classes ordered so confusions cluster; readable at 101 classes."""
    order = cluster_order(confusion)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    rates = rates[np.ix_(order, order)]
    names = [class_names[i] for i in order]
    n = len(names)
    side = min(max(6.0, 0.16 * n + 3), 24.0)
    font = max(4.0, min(10.0, 0.5 * side * 72 / max(n, 1)))  # half a row's height, in points
    fig = _figure(figsize=(side, side), dpi=110)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if rates[i, j] >= 0.005:
                    ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=font, color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    _save(fig, path)
    return path


def write_report(confusion: np.ndarray, class_names: list[str], folder: Path, stage: str, metrics: dict[str, float]) -> Path:
    """Write ``per_class.csv``, ``report.md``, ``metrics.json`` and ``confusion_matrix.png`` for one evaluation into
    ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    rows = per_class_metrics(confusion, class_names)

    def write_rows(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(folder / "per_class.csv", write_rows)
    total = int(confusion.sum())
    lines = [
        f"# {stage} report",
        "",
        f"{total} images, {len(class_names)} classes.",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {key} | {value:.4f} |" for key, value in sorted(metrics.items())],
        "",
        "## Most confused pairs",
        "",
        "| true class | predicted as | images | share of the true class |",
        "| --- | --- | --- | --- |",
        *[f"| {a} | {b} | {count} | {share:.1%} |" for a, b, count, share in confused_pairs(confusion, class_names)],
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |" for r in rows],
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
    ]
    write_text(folder / "report.md", "\n".join(lines))
    accuracy = float(np.trace(confusion)) / max(total, 1)
    plot_confusion(confusion, class_names, folder / "confusion_matrix.png", f"{stage}: accuracy {accuracy:.3f} on {total} images")
    return folder


def plot_training_curves(metrics_csv: Path, path: Path) -> Path | None:
    """Loss, accuracy and learning rate over training, from a CSVLogger's ``metrics.csv``, as one PNG."""
    if not metrics_csv.is_file():
        return None
    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))

    def series(key: str, x: str = "step") -> tuple[list[float], list[float]]:
        points = [(float(r[x]), float(r[key])) for r in rows if r.get(key) not in (None, "") and r.get(x) not in (None, "")]
        return [p[0] for p in points], [p[1] for p in points]

    lr_key = next((k for k in (rows[0] if rows else {}) if k.startswith("lr")), None)
    fig = _figure(figsize=(15, 4), dpi=100)
    axes = fig.subplots(1, 3)
    for key, label in (("train/loss", "train loss (per step)"), ("val/loss", "validation loss")):
        axes[0].plot(*series(key), marker="o" if key.startswith("val") else None, label=label)
    axes[0].set_title("loss")
    for key, label in (("train/acc", "train accuracy"), ("val/acc", "validation accuracy"), ("val/acc_top5", "validation top-5")):
        axes[1].plot(*series(key), marker="o", label=label)
    axes[1].set_title("accuracy (per epoch)")
    axes[1].set_ylim(0, 1.02)
    if lr_key:
        axes[2].plot(*series(lr_key), label=lr_key)
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return path


def _figure(**kwargs: Any) -> Any:
    """A matplotlib `Figure` of its own, drawn by the Agg canvas: no pyplot, so the process's backend (a notebook's
    inline one, say) and pyplot's figure list stay as they were."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)


def human_size(num_bytes: float) -> str:
    """``2.67 MB``-style sizes for summaries."""
    units = ["B", "KB", "MB", "GB", "TB"]
    power = min(int(math.log(max(num_bytes, 1), 1000)), len(units) - 1)
    return f"{num_bytes / 1000**power:.{0 if power == 0 else 2}f} {units[power]}"
