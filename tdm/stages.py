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
from tdm.paths import ITEMS_FILE, META_FILE, MODEL_FILE, TRAIN_LOG_FILE, TREE_FILE, Paths
from tdm.tree import Tree

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- data
def generate(cfg: Config, out: Path) -> dict:
    """Write the seeded synthetic data set as a UserBehavior.csv file, chunk by chunk (memory
    bounded by ``synthetic.chunk_rows`` and the item corpus, not by the number of rows)."""
    from tdm.data.synthetic import write_synthetic_csv

    t0 = time.perf_counter()
    rows = write_synthetic_csv(
        cfg.synthetic, out, progress=lambda done: log.info("generated %d rows", done)
    )
    return {"path": str(out), "rows": rows, "seconds": round(time.perf_counter() - t0, 2)}


def prepare(cfg: Config, out_dir: Path) -> dict:
    """Load the raw data (``data`` section) and write the prepared folder (Sec. 5.1)."""
    from tdm.data.checks import check_loaded
    from tdm.data.loaders import load_dataset
    from tdm.data.protocol import prepare as prepare_data

    t0 = time.perf_counter()
    frame = load_dataset(cfg.data, cfg.synthetic)
    check_loaded(frame, cfg.data, cfg.synthetic)  # suspicious data: raise or warn, as GX would
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


def relearn_tree(
    cfg: Config,
    embeddings_path: Path,
    out_path: Path,
    model_dir: Path | None = None,
    prepared_dir: Path | None = None,
) -> dict:
    """Re-learn the tree after a round, as ``tree.learner`` says.

    - ``kmeans``: balanced k-means over the trained item embeddings (Sec. 3.5); reads
      ``embeddings_path``.
    - ``jtm``: JTM's tree learning (``tdm.jtm.learn_tree``): every item moves to where the
      round's model gives its training targets the highest likelihood, with the trained tree's
      shape; reads ``model_dir`` (the trained model and its tree) and ``prepared_dir`` (the
      training samples, as ``data.max_history``, ``data.min_history`` and
      ``train.with_eval_history`` make them). Scores on ``train.device`` with
      ``train.num_threads``. The new tree has the trained tree's shape (its arity, whatever
      ``tree.arity`` says now).

    The tree is written atomically. Returns the tree's statistics (``jtm``: with the samples
    used, the fraction of items that moved per step and the seconds taken).
    """
    if cfg.tree.learner == "jtm":
        import torch

        from tdm.checkpoint import load_model_dir
        from tdm.config import ConfigError
        from tdm.data.protocol import load_prepared
        from tdm.data.samples import TrainSamples
        from tdm.jtm import MAX_SLOTS, learn_tree
        from tdm.train import resolve_device
        from tdm.tree_build import moved_fraction

        if model_dir is None or prepared_dir is None:
            raise ConfigError("tree.learner jtm: needs the round's model folder and prepared data")
        t0 = time.perf_counter()
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        device = resolve_device(cfg.train.device)
        model, old_tree = load_model_dir(model_dir, map_location=device, model_name=cfg.model.name)
        if old_tree.max_arity**cfg.tree.jtm_gap > MAX_SLOTS:
            raise ConfigError(
                f"tree.jtm_gap: {cfg.tree.jtm_gap} gives {old_tree.max_arity}**"
                f"{cfg.tree.jtm_gap} slots per step on the trained tree, at most {MAX_SLOTS}"
            )
        source = TrainSamples(
            load_prepared(prepared_dir),
            cfg.data.max_history,
            cfg.data.min_history,
            cfg.train.with_eval_history,
        )
        steps: list[dict] = []
        tree = learn_tree(
            model,
            old_tree,
            source.split.items[source.positions],
            lambda index: source.batch(index)[:2],
            gap=cfg.tree.jtm_gap,
            samples_per_item=cfg.tree.jtm_samples_per_item,
            seed=cfg.tree.seed,
            lengths=source.lengths,
            device=device,
            callback=steps.append,
        )
        tree.save(out_path)
        return {
            **tree.stats(),
            "learner": "jtm",
            "samples": source.n_samples,
            "samples_used": max((s["samples_scored"] for s in steps), default=0),
            "moved_fraction": round(moved_fraction(old_tree, tree), 4),
            "steps": steps,
            "seconds": round(time.perf_counter() - t0, 2),
        }
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


def tree_report(
    tree: Tree,
    item_category: np.ndarray | None = None,
    truth: dict[str, np.ndarray] | None = None,
) -> dict:
    """Tree statistics, with per-level category purity when categories are known, and under
    ``truth`` how well the tree recovers each true grouping (``tdm.tree_build.truth_agreement``
    at the level closest to its number of groups).

    Args:
        tree: the tree.
        item_category: (n_items,) category of each item index, or None.
        truth: grouping name (``category``, ``department``) -> (n_items,) true group of each
            item index (``synthetic_truth``), or None.
    Returns:
        ``tree.stats()`` plus ``category_purity`` (per level) and ``truth``: ``{name: {"level",
        "nodes", "groups", "purity", "nmi"}}``, each when its input is given.
    """
    report = tree.stats()
    if item_category is not None:
        from tdm.tree_build import tree_purity

        report["category_purity"] = np.round(tree_purity(tree, item_category), 4).tolist()
    if truth:
        from tdm.tree_build import truth_agreement

        report["truth"] = {
            name: {
                k: round(v, 4) if isinstance(v, float) else v
                for k, v in truth_agreement(tree, labels).items()
            }
            for name, labels in truth.items()
        }
    return report


def truth_groups(cfg: Config, items) -> dict[str, np.ndarray]:
    """The groupings a tree is measured against (``tree_report``'s ``truth``): the generator's
    categories and departments for the synthetic data (``synthetic_truth``), else the data's own
    item categories (MovieLens: the genre of ``data.category_rule``), the only grouping known
    there, under the name ``category``."""
    return synthetic_truth(cfg, items) or {"category": items["category_id"].to_numpy(np.int64)}


def synthetic_truth(cfg: Config, items) -> dict[str, np.ndarray] | None:
    """The generator's true category and department of every prepared item, when the prepared
    items are the ones ``cfg.synthetic`` generates; None otherwise.

    The data comes from the generator in memory (``data.source: synthetic``) or from a
    UserBehavior.csv file that ``tdm generate`` wrote (the default data), possibly from other
    ``synthetic`` params than the run's. So the check is the data itself: every prepared item's
    raw id must be an item of ``tdm.data.synthetic.true_taxonomy(cfg.synthetic)`` with the same
    raw category id (raw ids are distinct random integers: another data set, or other params,
    does not match by chance). MovieLens data and ids out of the generator's range are turned
    down before anything is generated.

    Args:
        cfg: the config (``data.source`` and ``synthetic`` are read).
        items: the prepared ``items.parquet`` frame (item_index, item_id, category_id).
    Returns:
        ``{"category": (n_items,) raw category id, "department": (n_items,) department}`` per
        item index, or None.
    """
    syn = cfg.synthetic
    if cfg.data.source == "movielens" or len(items) == 0 or len(items) > syn.n_items:
        return None
    ids = items["item_id"].to_numpy(dtype=np.int64)
    if ids.min() < 1 or ids.max() > 10 * syn.n_items:  # the generator's id range
        return None
    from tdm.data.synthetic import true_taxonomy

    truth = true_taxonomy(syn)
    order = np.argsort(truth["item_id"].to_numpy(), kind="stable")
    known = truth["item_id"].to_numpy()[order]
    pos = np.minimum(np.searchsorted(known, ids), len(known) - 1)
    rows = order[pos]  # (n_items,) truth row of each prepared item
    category = truth["category_id"].to_numpy()[rows]
    if not (
        np.array_equal(known[pos], ids)
        and np.array_equal(category, items["category_id"].to_numpy(dtype=np.int64))
    ):
        log.info("the items are not those of the synthetic params: no tree-vs-truth report")
        return None
    index = items["item_index"].to_numpy()
    out = {}
    for name, values in (("category", category), ("department", truth["department"].to_numpy())):
        by_index = np.zeros(int(index.max()) + 1, dtype=np.int64)
        by_index[index] = values if name == "category" else values[rows]
        out[name] = by_index
    return out


# --------------------------------------------------------------------------------------- model
# The params that training reads (also the `params` of the train stages in dvc.yaml, a test
# checks): a checkpoint resumes only under the same values of these, except the few that do not
# change what is learnt.
TRAIN_PARAMS = (
    "model",
    "sampler",
    "train",
    "data.max_history",
    "data.min_history",
    "data.time_windows",
    "eval.topk",
    "retrieval",
    "rounds.warm_start",
)
NOT_FINGERPRINTED = ("train.progress", "train.num_threads", "train.device", "train.prefetch")


def train_fingerprint(
    cfg: Config, prepared_dir: Path, tree_path: Path, init_from: Path | None
) -> dict[str, Any]:
    """Everything that determines a training run: the params it reads (``TRAIN_PARAMS`` but
    ``NOT_FINGERPRINTED``) and the hashes of the prepared data, the tree and the start model."""
    from tdm.io import manifest_digest, sha256_file

    full = cfg.to_dict()
    params: dict[str, Any] = {}
    for name in TRAIN_PARAMS:
        section, _, key = name.partition(".")
        params[name] = full[section][key] if key else dict(full[section])
    for name in NOT_FINGERPRINTED:
        section, _, key = name.partition(".")
        params[section].pop(key, None)
    return {
        "params": params,
        "prepared": manifest_digest(prepared_dir),
        "tree": sha256_file(tree_path),
        "init_from": manifest_digest(init_from) if init_from is not None else None,
    }


def train(
    cfg: Config,
    prepared_dir: Path,
    tree_path: Path,
    out_dir: Path,
    init_from: Path | None = None,
    callback: Callable[[int, dict], None] | None = None,
    fresh: bool = False,
) -> dict:
    """Train the scorer on a tree (Eq. 4) and write a self-contained model folder.

    The folder holds ``model.pt`` (weights with their config), the tree, the item table, the
    feature metadata, the training log and a manifest of their hashes, so ``Recommender.load``
    needs nothing else and notices a changed byte. Per-epoch checkpoints go to
    ``<out_dir>.ckpt/``; an interrupted run resumes from there when nothing that determines
    training changed (``train_fingerprint``), else it starts fresh and says why.

    Args:
        cfg: the whole config (training reads ``TRAIN_PARAMS``).
        prepared_dir, tree_path: the prepared data and the tree to train on.
        out_dir: the model folder to (over)write.
        init_from: a model folder to warm-start from (Sec. 3.5), or None.
        callback: ``callback(epoch, stats)`` after every epoch, with ``valid_recall``.
        fresh: ignore (and remove) any checkpoint.
    Returns:
        The training log (also written as ``train_log.json``).
    """
    import torch

    from tdm import distributed
    from tdm.checkpoint import Checkpointer, load_model_dir, save_model
    from tdm.data.protocol import load_prepared
    from tdm.data.samples import TrainSamples
    from tdm.model import build_model
    from tdm.sampler import LayerwiseSampler
    from tdm.train import resolve_device, warm_start
    from tdm.train import train as fit

    out_dir = Path(out_dir)
    if cfg.train.nproc > 1 and not distributed.launched():  # start the ranks and wait
        spec = {
            "config": cfg.to_dict(),
            "prepared": str(Path(prepared_dir).resolve()),
            "tree": str(Path(tree_path).resolve()),
            "out": str(out_dir.resolve()),
            "init_from": str(Path(init_from).resolve()) if init_from is not None else None,
            "fresh": fresh,
        }
        launch_dir = out_dir.with_name(out_dir.name + ".launch")
        launch_dir.mkdir(parents=True, exist_ok=True)
        try:
            distributed.launch(spec, launch_dir / "spec.json", cfg.train.nproc, callback)
        finally:
            shutil.rmtree(launch_dir, ignore_errors=True)
        import json

        return json.loads((out_dir / TRAIN_LOG_FILE).read_text())

    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = distributed.setup(resolve_device(cfg.train.device))
    lead = distributed.rank() == 0
    try:
        data = load_prepared(prepared_dir)
        tree = Tree.load(tree_path)
        model = build_model(cfg.model, tree.n_nodes, cfg.data.time_windows, seed=cfg.train.seed)
        if init_from is not None:
            old_model, old_tree = load_model_dir(init_from, model_name=cfg.model.name)
            warm_start(model, old_model, old_tree, tree)
        sampler = LayerwiseSampler.from_config(tree, cfg.sampler)  # profile, replacement too
        negatives = sampler.negatives_per_level
        source = TrainSamples(
            data, cfg.data.max_history, cfg.data.min_history, cfg.train.with_eval_history
        )
        checkpointer = Checkpointer(
            out_dir.with_name(out_dir.name + ".ckpt"),
            train_fingerprint(cfg, Path(prepared_dir), Path(tree_path), init_from),
            cfg.model,
        )
        if fresh and lead and checkpointer.last.exists():
            log.info("--fresh: removing the checkpoints in %s", checkpointer.directory)
            checkpointer.clear()
        distributed.barrier()
        reporter = None
        if lead and cfg.train.test_curve:  # Fig. 5, reporting only: never read by training
            reporter = TestCurveReporter(model, tree, data, cfg, sampler)
        monitor = ValidationMonitor(model, tree, data, cfg, callback, reporter) if lead else None
        t0 = time.perf_counter()
        result = fit(
            model,
            tree,
            source,
            sampler,
            cfg.train,
            checkpointer=checkpointer,
            callback=monitor,
            device=device,
        )
        seconds = time.perf_counter() - t0
        if not lead:  # rank 0 alone publishes the model
            return {}
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
                "epochs_run": len(result.losses),
                "steps": sum(int(s["steps"]) for s in result.stats),
                "losses": list(result.losses),
                "samples": source.n_samples,
                "valid_recall": monitor.history,
                "best_epoch": best_epoch,
                "negatives_per_level": list(negatives),
                "seconds": round(seconds, 2),
                "samples_per_s": [round(s["samples_per_s"], 1) for s in result.stats],
                "device": str(result.device),
                "processes": distributed.world_size(),
                "torch": torch.__version__,
            }
            if reporter is not None:
                summary["test_curve"] = reporter.curve()
            write_json(tmp / TRAIN_LOG_FILE, summary)
        checkpointer.clear()
        return summary
    finally:
        distributed.teardown()


def split_recall(model, tree: Tree, data, split, cfg: Config) -> float:
    """Recall@M (``eval.topk``, no filtering) of ``split``'s users by beam search
    (``retrieval``)."""
    from tdm.config import EvalConfig
    from tdm.evaluation import evaluate_split
    from tdm.recommender import Recommender

    device = next(model.parameters()).device
    rec = Recommender(model, tree, data.items, data.meta, device)
    eval_cfg = EvalConfig(topk=cfg.eval.topk, filters=["none"])
    return float(evaluate_split(rec.ranker(cfg.retrieval), data, split, eval_cfg)["none"]["recall"])


class ValidationMonitor:
    """The trainer's epoch callback: Recall@M of the validation users (beam search, no
    filtering) after every epoch. Keeps the best weights (``train.select_best``) and asks the
    trainer to stop after ``train.patience`` epochs without improvement. Test users are never
    looked at for that. Its state is checkpointed with the weights, so a resumed run picks the
    best epoch among all epochs.

    A ``reporter`` (``TestCurveReporter``) is called after the epoch's decisions are made; what
    it returns only joins the stats handed to ``callback``."""

    def __init__(self, model, tree: Tree, data, cfg: Config, callback=None, reporter=None) -> None:
        self.model, self.tree, self.data, self.cfg, self.callback = model, tree, data, cfg, callback
        self.reporter = reporter
        self.history: list[float] = []
        self.best_epoch = -1
        self.best_state: dict | None = None

    def recall(self) -> float:
        return split_recall(self.model, self.tree, self.data, self.data.valid, self.cfg)

    def __call__(self, epoch: int, stats: dict) -> bool:
        recall = self.recall() if len(self.data.valid.users) else float("nan")
        self.history.append(recall)
        log.info("epoch %d: validation Recall@%d %.4f", epoch + 1, self.cfg.eval.topk, recall)
        if self.best_epoch < 0 or recall > self.history[self.best_epoch]:
            self.best_epoch = len(self.history) - 1
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        patience = self.cfg.train.patience
        stop = patience > 0 and len(self.history) - 1 - self.best_epoch >= patience
        # decided: the best epoch and the stop; the test curve is reported after, never read
        report = self.reporter(epoch) if self.reporter is not None else {}
        if self.callback is not None:
            self.callback(epoch, {**stats, "valid_recall": recall, **report})
        return stop

    def state_dict(self) -> dict:
        state = {
            "history": list(self.history),
            "best_epoch": self.best_epoch,
            "best": self.best_state,
        }
        if self.reporter is not None:
            state["reporter"] = self.reporter.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.best_epoch = int(state["best_epoch"])
        self.best_state = state["best"]
        if self.reporter is not None and state.get("reporter"):
            self.reporter.load_state_dict(state["reporter"])


class TestCurveReporter:
    """Reporting only, for Fig. 5: after every epoch, the *test* users' Eq. 4 loss and their
    Recall@M (``train.test_curve``, off by default).

    Nothing it computes reaches training or model selection: ``ValidationMonitor`` calls it
    after the epoch's best-epoch and early-stopping decisions (taken on validation users only),
    it runs without gradients in eval mode, and it draws its negatives from its own copy of the
    sampler, so a run with it ends with the same weights as a run without it.

    The test loss: every distinct (test user, ground-truth item) pair is one sample whose
    features are the user's known history (the evaluation's, ``eval_batch``), with the positive
    and negative nodes of the training sampler's layout, drawn from one fixed seed, so every
    epoch scores the same pairs; the mean of Eq. 4 over all valid (sample, node) pairs, in eval
    mode (BatchNorm's running statistics). Recall@M: as ``split_recall``.

    Args:
        model, tree, data, cfg: as training has them.
        sampler: the training sampler; a copy with its own generator draws the negatives.
        batch_size: samples scored at a time.
    """

    __test__ = False  # not a pytest class
    SEED_KEY = 0x7E57  # the copy's generator: (sampler seed, SEED_KEY) every epoch

    def __init__(self, model, tree: Tree, data, cfg: Config, sampler, batch_size: int = 1024):
        import copy

        self.model, self.tree, self.data, self.cfg = model, tree, data, cfg
        self.sampler = copy.copy(sampler)  # reseeded below: the training sampler is untouched
        self.batch_size = batch_size
        self.epochs: list[int] = []
        self.losses: list[float] = []
        self.recalls: list[float] = []

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(P,) user rows of the test split and (P,) item indices: distinct truth pairs."""
        test = self.data.test
        counts = np.diff(test.truth_offsets)
        rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        keys = np.unique(rows * (self.data.n_items + 1) + test.truth_items)
        return keys // (self.data.n_items + 1), keys % (self.data.n_items + 1)

    def loss(self) -> float:
        """The test users' Eq. 4 loss (see the class docstring)."""
        import torch
        import torch.nn.functional as F

        from tdm.data.features import eval_batch

        rows, targets = self.pairs()
        if len(rows) == 0:
            return float("nan")
        self.sampler.reseed(self.SEED_KEY)
        device = next(self.model.parameters()).device
        node_rows = torch.as_tensor(self.tree.embedding_rows(), dtype=torch.int64, device=device)
        was_training = self.model.training
        self.model.eval()
        total, weight = 0.0, 0.0
        try:
            with torch.no_grad():
                for s in range(0, len(rows), self.batch_size):
                    hist, windows = eval_batch(
                        self.data.test,
                        rows[s : s + self.batch_size],
                        int(self.data.meta["max_history"]),
                        self.data.window_bounds,
                    )
                    nodes, labels, mask = self.sampler.sample(targets[s : s + self.batch_size])
                    logits = self.model(
                        torch.from_numpy(hist).to(device),  # (B, L)
                        torch.from_numpy(windows).to(device),  # (B, L)
                        node_rows[torch.from_numpy(nodes).to(device)],  # (B, S)
                    )  # (B, S)
                    w = torch.from_numpy(mask).to(device=device, dtype=torch.float32)
                    total += F.binary_cross_entropy_with_logits(
                        logits.float(),
                        torch.from_numpy(labels).to(device),
                        weight=w,
                        reduction="sum",
                    ).item()
                    weight += w.sum().item()
        finally:
            self.model.train(was_training)
        return total / max(weight, 1.0)

    def __call__(self, epoch: int) -> dict[str, float]:
        loss = self.loss()
        recall = (
            split_recall(self.model, self.tree, self.data, self.data.test, self.cfg)
            if len(self.data.test.users)
            else float("nan")
        )
        self.epochs.append(int(epoch))
        self.losses.append(loss)
        self.recalls.append(recall)
        log.info(
            "epoch %d: test loss %.4f, test Recall@%d %.4f (reported only)",
            epoch + 1,
            loss,
            self.cfg.eval.topk,
            recall,
        )
        return {"test_loss": loss, "test_recall": recall}

    def curve(self) -> dict:
        """``{"split": "test", "k", "epoch" (1-based), "loss", "recall"}`` of the epochs run."""
        return {
            "split": "test",
            "k": self.cfg.eval.topk,
            "epoch": [e + 1 for e in self.epochs],
            "loss": [round(x, 6) for x in self.losses],
            "recall": [round(x, 6) for x in self.recalls],
        }

    def state_dict(self) -> dict:
        return {"epochs": list(self.epochs), "losses": self.losses, "recalls": self.recalls}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = list(state["epochs"])
        self.losses = list(state["losses"])
        self.recalls = list(state["recalls"])


def export_embeddings(model_dir: Path, out_path: Path) -> dict:
    """Write the trained item (leaf) embeddings, (n_items, d) float32 in item-index order."""
    import io

    from tdm.checkpoint import load_model_dir

    model, tree = load_model_dir(model_dir)
    emb = model.embedding.weight.detach().float().cpu().numpy()[: tree.n_items]
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(emb, dtype=np.float32))
    write_bytes(Path(out_path), buf.getvalue())
    return {"path": str(out_path), "shape": list(emb.shape)}


# --------------------------------------------------------------------------------------- eval
def evaluate(cfg: Config, prepared_dir: Path, model_dir: Path, out_path: Path) -> dict:
    """Precision/Recall/F-Measure/Novelty@M (Eq. 5-7) of TDM and of most-popular, per filter
    mode, plus the layer-wise recall of beam search vs brute force (Fig. 4) and the tree's
    report (``tree_report``: with ``truth`` on data the synthetic generator made)."""
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
        "tree": tree_report(
            rec.tree, data.items["category_id"].to_numpy(), truth_groups(cfg, data.items)
        ),
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
            relearn_tree(
                cfg,
                paths.embeddings(r),
                paths.tree(r + 1),
                model_dir=paths.model(r),
                prepared_dir=paths.prepared,
            )
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
