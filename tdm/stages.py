"""Stage functions: one per pipeline step, each reading its inputs from and writing its outputs to
files. The CLI, the DVC stages and the Prefect tasks all call these, so every door produces the
same artefacts at the same paths. Every output is written to a temporary path and renamed, so a
failed stage never leaves a half-written artefact.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tdm.config import Config
from tdm.io import atomic_dir, write_bytes, write_json
from tdm.paths import Paths
from tdm.tree import Tree

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
TREE_FILE = "tree.tree"
ITEMS_FILE = "items.parquet"
META_FILE = "meta.json"
TRAIN_LOG_FILE = "train_log.json"


# --------------------------------------------------------------------------------------- data
def generate(cfg: Config, out: Path) -> dict:
    """Write the seeded synthetic data set as a UserBehavior.csv file."""
    from tdm.data.synthetic import generate as gen
    from tdm.data.synthetic import write_userbehavior_csv

    frame = gen(cfg.synthetic)
    write_userbehavior_csv(frame, out)
    return {"path": str(out), "rows": len(frame)}


def prepare(cfg: Config, out_dir: Path) -> dict:
    """Load the raw data (``data`` section) and write the prepared folder (Sec. 5.1)."""
    from tdm.data.loaders import load_dataset
    from tdm.data.protocol import prepare as prepare_data

    t0 = time.perf_counter()
    frame = load_dataset(cfg.data, cfg.synthetic)
    meta = prepare_data(frame, cfg.data, out_dir)
    log.info("prepared %s in %.1f s", out_dir, time.perf_counter() - t0)
    return meta


# --------------------------------------------------------------------------------------- trees
def init_tree(cfg: Config, prepared_dir: Path, out_path: Path) -> dict:
    """Category-based initial tree over the prepared items (Sec. 3.5)."""
    import pandas as pd

    from tdm.tree_build import category_tree

    items = pd.read_parquet(Path(prepared_dir) / ITEMS_FILE)
    tree = category_tree(
        items["item_index"].to_numpy(),
        items["category_id"].to_numpy(),
        arity=cfg.tree.arity,
        seed=cfg.tree.seed,
    )
    tree.save(out_path)
    return tree_report(tree, items["category_id"].to_numpy())


def relearn_tree(cfg: Config, embeddings_path: Path, out_path: Path) -> dict:
    """Re-learn the tree by balanced k-means over the trained item embeddings (Sec. 3.5)."""
    from tdm.tree_build import kmeans_tree

    emb = np.load(embeddings_path)
    tree = kmeans_tree(
        np.arange(len(emb)),
        emb,
        arity=cfg.tree.arity,
        seed=cfg.tree.seed,
        iters=cfg.tree.kmeans_iters,
    )
    tree.save(out_path)
    return tree.stats()


def tree_report(tree: Tree, item_category: np.ndarray | None = None) -> dict:
    """Tree statistics, with per-level category purity when categories are known."""
    report = tree.stats()
    if item_category is not None:
        from tdm.tree_build import tree_purity

        report["category_purity"] = np.round(tree_purity(tree, item_category), 4).tolist()
    return report


# --------------------------------------------------------------------------------------- model
def train(
    cfg: Config,
    prepared_dir: Path,
    tree_path: Path,
    out_dir: Path,
    init_from: Path | None = None,
    callback: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train the scorer on a tree (Eq. 4) and write a self-contained model folder.

    The folder holds ``model.pt`` (weights with their config), the tree, the item table and the
    feature metadata, so ``Recommender.load`` needs nothing else. Per-epoch checkpoints go to
    ``<out_dir>.ckpt/`` and an interrupted run resumes from there.
    """
    import torch

    from tdm.data.protocol import load_prepared
    from tdm.model import build_model
    from tdm.sampler import LayerwiseSampler, negatives_for_levels
    from tdm.train import load_checkpoint, save_model, warm_start
    from tdm.train import train as fit

    out_dir = Path(out_dir)
    data = load_prepared(prepared_dir)
    tree = Tree.load(tree_path)
    model = build_model(cfg.model, tree.n_nodes, cfg.data.time_windows, seed=cfg.train.seed)
    if init_from is not None:
        old_model = load_checkpoint(Path(init_from) / MODEL_FILE)
        warm_start(model, old_model, Tree.load(Path(init_from) / TREE_FILE), tree)
    negatives = cfg.sampler.negatives_per_level or negatives_for_levels(
        tree.level_sizes, cfg.sampler.total_negatives
    )
    sampler = LayerwiseSampler(tree, negatives, mode=cfg.sampler.mode, seed=cfg.sampler.seed)
    source = TrainSamples(
        data, cfg.data.max_history, cfg.data.min_history, cfg.train.with_eval_history
    )
    ckpt_dir = out_dir.with_name(out_dir.name + ".ckpt")
    monitor = ValidationMonitor(model, tree, data, cfg, callback)
    t0 = time.perf_counter()
    result = fit(
        model,
        tree,
        source,
        sampler,
        cfg.train,
        checkpoint_dir=ckpt_dir,
        callback=monitor,
        resume=True,
    )
    seconds = time.perf_counter() - t0
    best_epoch = len(result.losses) - 1
    if cfg.train.select_best and monitor.best_state is not None:
        model.load_state_dict(monitor.best_state)
        best_epoch = monitor.best_epoch

    with atomic_dir(out_dir, manifest=True) as tmp:
        save_model(model, tmp / MODEL_FILE, cfg)
        tree.save(tmp / TREE_FILE)
        shutil.copy2(Path(prepared_dir) / ITEMS_FILE, tmp / ITEMS_FILE)
        shutil.copy2(Path(prepared_dir) / META_FILE, tmp / META_FILE)
        summary = {
            "epochs": cfg.train.epochs,
            "losses": list(result.losses),
            "samples": source.n_samples,
            "valid_recall": monitor.history,
            "best_epoch": best_epoch,
            "negatives_per_level": list(negatives),
            "seconds": round(seconds, 2),
            "device": str(result.device),
            "torch": torch.__version__,
        }
        write_json(tmp / TRAIN_LOG_FILE, summary)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary


class ValidationMonitor:
    """The trainer's epoch callback: Recall@M of the validation users (beam search, no
    filtering) after every epoch. Keeps the best weights (``train.select_best``) and asks the
    trainer to stop after ``train.patience`` epochs without improvement. Test users are never
    looked at. After a resumed run, the best epoch is chosen among the epochs run since."""

    def __init__(self, model, tree: Tree, data, cfg: Config, callback=None) -> None:
        self.model, self.tree, self.data, self.cfg, self.callback = model, tree, data, cfg, callback
        self.history: list[float] = []
        self.best_epoch = -1
        self.best_state: dict | None = None

    def recall(self) -> float:
        from tdm.config import EvalConfig
        from tdm.evaluation import evaluate_split
        from tdm.recommender import Recommender

        device = next(self.model.parameters()).device
        rec = Recommender(self.model, self.tree, self.data.items, self.data.meta, device)
        eval_cfg = EvalConfig(topk=self.cfg.eval.topk, filters=["none"])
        valid = self.data.valid
        return float(
            evaluate_split(rec.ranker(self.cfg.retrieval), self.data, valid, eval_cfg)["none"][
                "recall"
            ]
        )

    def __call__(self, epoch: int, stats: dict) -> bool:
        recall = self.recall() if len(self.data.valid.users) else float("nan")
        self.history.append(recall)
        log.info("epoch %d: validation Recall@%d %.4f", epoch + 1, self.cfg.eval.topk, recall)
        if self.best_epoch < 0 or recall > self.history[self.best_epoch]:
            self.best_epoch = len(self.history) - 1
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.callback is not None:
            self.callback(epoch, {**stats, "valid_recall": recall})
        patience = self.cfg.train.patience
        return patience > 0 and len(self.history) - 1 - self.best_epoch >= patience


class TrainSamples:
    """Training samples derived from the prepared CSR sequences (the trainer's sample source).

    Every position with at least ``min_history`` earlier behaviours of its user is a sample; its
    features are the at most ``max_history`` behaviours before it, split into time windows.
    """

    def __init__(
        self, data, max_history: int, min_history: int, with_eval_history: bool = False
    ) -> None:
        from tdm.data.protocol import TrainSplit, training_positions

        self.split = data.train
        if with_eval_history:  # the known first halves of the evaluation users join training
            evals = (data.valid, data.test)
            self.split = TrainSplit(
                users=np.concatenate([data.train.users, *(e.users for e in evals)]),
                items=np.concatenate([data.train.items, *(e.hist_items for e in evals)]),
                times=np.concatenate([data.train.times, *(e.hist_times for e in evals)]),
                offsets=_concat_offsets([data.train.offsets, *(e.hist_offsets for e in evals)]),
            )
        self.max_history = max_history
        self.window_bounds = data.window_bounds
        self.positions = training_positions(self.split, min_history)
        self.n_samples = len(self.positions)
        offsets = self.split.offsets
        self.users = np.searchsorted(offsets, self.positions, side="right") - 1  # (n_samples,)
        starts = offsets[:-1][self.users]
        self.lengths = np.minimum(self.positions - starts, max_history)  # (n_samples,)

    def batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Histories (right-aligned) trimmed to the longest one in the batch."""
        from tdm.data.features import train_batch

        hist, windows, targets = train_batch(
            self.split, self.positions[index], self.max_history, self.window_bounds
        )
        width = max(int(self.lengths[index].max()), 1)
        return hist[:, -width:], windows[:, -width:], targets


def _concat_offsets(parts: list[np.ndarray]) -> np.ndarray:
    """CSR offsets of the concatenation of several CSR arrays."""
    out, base = [np.zeros(1, dtype=np.int64)], 0
    for offsets in parts:
        out.append(offsets[1:] + base)
        base += offsets[-1]
    return np.concatenate(out)


def export_embeddings(model_dir: Path, out_path: Path) -> dict:
    """Write the trained item (leaf) embeddings, (n_items, d) float32 in item-index order."""
    import io

    from tdm.train import load_checkpoint

    model = load_checkpoint(Path(model_dir) / MODEL_FILE)
    tree = Tree.load(Path(model_dir) / TREE_FILE)
    emb = model.embedding.weight.detach().float().cpu().numpy()[: tree.n_items]
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(emb, dtype=np.float32))
    write_bytes(Path(out_path), buf.getvalue())
    return {"path": str(out_path), "shape": list(emb.shape)}


# --------------------------------------------------------------------------------------- eval
def evaluate(cfg: Config, prepared_dir: Path, model_dir: Path, out_path: Path) -> dict:
    """Precision/Recall/F-Measure/Novelty@M (Eq. 5-7) of TDM and of most-popular, per filter
    mode, plus the layer-wise recall of beam search vs brute force (Fig. 4)."""
    from tdm.data.protocol import load_prepared
    from tdm.evaluation import evaluate_split, layerwise_report
    from tdm.recommender import Recommender

    data = load_prepared(prepared_dir)
    rec = Recommender.load(model_dir)
    split = data.split(cfg.eval.split)
    t0 = time.perf_counter()
    tdm_metrics = evaluate_split(rec.ranker(cfg.retrieval), data, split, cfg.eval)
    seconds = time.perf_counter() - t0
    from tdm.baselines.popular import MostPopular

    popular = MostPopular(data.items["train_count"].to_numpy())
    report = {
        "split": cfg.eval.split,
        "topk": cfg.eval.topk,
        "users": len(split.users),
        "tdm": tdm_metrics,
        "most_popular": evaluate_split(popular.ranker(), data, split, cfg.eval),
        "tree": tree_report(rec.tree, data.items["category_id"].to_numpy()),
        "retrieval_seconds": round(seconds, 3),
    }
    if cfg.eval.layerwise:
        report["layerwise_recall"] = layerwise_report(rec, split, cfg)
    write_json(out_path, report)
    return report


# --------------------------------------------------------------------------------------- rounds
def pipeline(
    cfg: Config, paths: Paths, on_round: Callable[[int, dict], None] | None = None
) -> dict:
    """The alternating rounds (Sec. 3.5): prepare -> init tree -> [train -> evaluate -> export ->
    relearn]*, writing ``metrics/round_<r>.json`` for every round."""
    t0 = time.perf_counter()
    prepare(cfg, paths.prepared)
    init_tree(cfg, paths.prepared, paths.tree(0))
    summary: dict[str, Any] = {"rounds": []}
    for r in range(cfg.rounds.count):
        init_from = paths.model(r - 1) if (r > 0 and cfg.rounds.warm_start) else None
        train_log = train(cfg, paths.prepared, paths.tree(r), paths.model(r), init_from=init_from)
        report = evaluate(cfg, paths.prepared, paths.model(r), paths.metrics(r))
        export_embeddings(paths.model(r), paths.embeddings(r))
        if r + 1 < cfg.rounds.count:
            relearn_tree(cfg, paths.embeddings(r), paths.tree(r + 1))
        row = {"round": r, "train_seconds": train_log["seconds"], **_headline(report)}
        summary["rounds"].append(row)
        log.info("round %d: %s", r, row)
        if on_round is not None:
            on_round(r, report)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _headline(report: dict) -> dict:
    out = {}
    for who in ("tdm", "most_popular"):
        for mode, values in report[who].items():
            out[f"{who}/{mode}/precision"] = values["precision"]
            out[f"{who}/{mode}/recall"] = values["recall"]
    return out
