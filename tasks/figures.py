"""PNG figures of one round for its MLflow run: the loss curve, the layer-wise recall, the
tree's balance and the test curves of Fig. 5.

matplotlib's object-oriented ``Figure`` API (no ``pyplot``): no global figure state, so the
Prefect tasks can draw from any thread, and importing this module costs nothing until a figure
is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tdm.tree import Tree


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def loss_curve(train_log: dict, path: Path, title: str = "") -> Path:
    """Training loss (Eq. 4) and validation Recall@M per epoch, from ``train_log.json``.

    Args:
        train_log: ``losses`` (E,) and ``valid_recall`` (E,), as ``tdm.stages.train`` writes.
        path: the PNG to write.
    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    losses = list(train_log.get("losses", []))
    recalls = list(train_log.get("valid_recall", []))
    epochs = np.arange(1, len(losses) + 1)
    fig = Figure(figsize=(8, 3.5))
    left, right = fig.subplots(1, 2)
    left.plot(epochs, losses, marker="o")
    left.set(xlabel="epoch", ylabel="training loss (BCE)", title="loss")
    if recalls:
        right.plot(np.arange(1, len(recalls) + 1), recalls, marker="o", color="tab:green")
        best = train_log.get("best_epoch")
        if best is not None and 0 <= best < len(recalls):
            right.axvline(best + 1, color="grey", linestyle=":", label="kept epoch")
            right.legend()
    right.set(xlabel="epoch", ylabel="validation Recall@M", title="validation recall")
    for ax in (left, right):
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def layerwise_recall(layerwise: dict, path: Path, title: str = "") -> Path:
    """Layer-wise Recall@k per tree level, beam search vs brute force (Sec. 5.4, Fig. 4).

    Args:
        layerwise: ``level``, ``beam``, ``brute_force`` lists (and ``k``), as in the
            ``layerwise_recall`` entry of ``metrics/round_<r>.json``.
        path: the PNG to write.
    """
    from matplotlib.figure import Figure

    levels = layerwise.get("level", [])
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(levels, layerwise.get("beam", []), marker="o", label="beam search (tree)")
    ax.plot(levels, layerwise.get("brute_force", []), marker="s", label="brute force (level)")
    ax.set(
        xlabel="tree level",
        ylabel=f"Recall@{layerwise.get('k', 'k')}",
        title=title or "layer-wise recall",
        ylim=(0, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def tree_balance(tree: Tree, path: Path, title: str = "") -> Path:
    """Nodes per level against a complete tree of the same arity, and the leaf-depth histogram.

    Args:
        tree: the round's tree.
        path: the PNG to write.
    """
    from matplotlib.figure import Figure

    sizes = np.asarray(tree.level_sizes)  # (depth+1,)
    levels = np.arange(len(sizes))
    complete = np.minimum(float(tree.max_arity) ** levels, float(tree.n_items))
    leaf_depths = np.asarray(tree.level)[tree.leaf_nodes]  # (n_items,)
    fig = Figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    left.bar(levels, sizes, label="nodes")
    left.plot(levels, complete, color="black", marker=".", label=f"complete {tree.max_arity}-ary")
    left.set(xlabel="level", ylabel="nodes", yscale="log", title="level sizes")
    left.legend()
    depths, counts = np.unique(leaf_depths, return_counts=True)
    right.bar(depths, counts, color="tab:orange")
    right.set(xlabel="leaf depth", ylabel="items", title="leaf depths")
    right.set_xticks(depths)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def test_curves(fig5: dict, path: Path, title: str = "") -> Path:
    """Test loss and test Recall@M per epoch, one line per tree (Sec. 5.4, Fig. 5).

    Args:
        fig5: ``k`` (M) and ``curves``: label -> ``epoch`` (E,), ``loss`` (E,), ``recall`` (E,),
            optionally ``loss_std`` and ``recall_std`` (E,) drawn as error bars (the benchmark's
            mean ± std over seeds; ``tdm.benchmark.summarise``'s ``fig5``). A curve is the
            ``test_curve`` of a ``train_log.json`` (``train.test_curve``).
        path: the PNG to write.
        title: the figure's title.
    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    epochs_seen: set[int] = set()
    for label, curve in fig5.get("curves", {}).items():
        epochs = np.asarray(curve.get("epoch", []), dtype=np.float64)
        epochs_seen.update(int(e) for e in epochs)
        for ax, key in ((left, "loss"), (right, "recall")):
            values = np.asarray(curve.get(key, []), dtype=np.float64)
            std = curve.get(f"{key}_std")
            spread = None if std is None or len(std) != len(values) else np.asarray(std)
            ax.errorbar(epochs, values, yerr=spread, marker="o", capsize=3, label=label)
    left.set(xlabel="epoch", ylabel="test loss (Eq. 4)", title="(a) test loss")
    right.set(xlabel="epoch", ylabel=f"test Recall@{fig5.get('k', 'M')}", title="(b) test recall")
    for ax in (left, right):
        if epochs_seen and len(epochs_seen) <= 20:
            ax.set_xticks(sorted(epochs_seen))
        ax.grid(alpha=0.3)
        if fig5.get("curves"):
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
