"""Behaviour of JTM's tree learning (tdm/jtm.py) and its relearn door (stage and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tdm.jtm import MAX_SLOTS, learn_tree, tree_log_likelihood
from tdm.tree import Tree
from tdm.tree_build import is_balanced, moved_fraction, subtree_leaf_counts, tree_purity

torch.set_num_threads(1)


class GroupScorer(nn.Module):
    """A scorer whose preferences are known: users of group g like exactly the nodes on the path
    to node ``g`` of ``level`` (in ``tree``'s numbering) and every node below it (logit
    ``+strength``), and no other node (``-strength``). A user's group is the group of the last
    item in its history."""

    def __init__(
        self, tree: Tree, item_group: np.ndarray, level: int, strength: float = 3.0
    ) -> None:
        super().__init__()
        n_groups = int(item_group.max()) + 1
        target = tree.level_offsets[level] + np.arange(n_groups)  # (G,) node of each group
        liked = np.zeros((n_groups, tree.n_nodes), dtype=bool)
        ancestors = tree.ancestors(target)  # (G, depth+1)
        for g in range(n_groups):
            liked[g, ancestors[g][ancestors[g] >= 0]] = True
            below = np.array([target[g]])
            while len(below):
                liked[g, below] = True
                kids = tree.children_of(below).ravel()
                below = kids[kids >= 0]
        table = np.zeros((n_groups, tree.n_nodes), dtype=np.float32)  # by embedding row
        table[:, tree.embedding_rows()] = np.where(liked, strength, -strength)
        self.register_buffer("table", torch.as_tensor(table))
        self.register_buffer("item_group", torch.as_tensor(item_group, dtype=torch.int64))
        self.target = target
        self.embedding = nn.Embedding(tree.n_nodes, 2)

    def user_state(self, hist: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        return self.item_group[hist[:, -1]]  # (B,) group

    def score(self, state: torch.Tensor, node_rows: torch.Tensor) -> torch.Tensor:
        return self.table[state[:, None], node_rows.clamp_min(0)]  # (B, N)


def _toy(n_items: int, arity: int, n_groups: int, per_item: int = 5, seed: int = 0):
    """A random balanced tree, items of ``n_groups`` groups, and ``per_item`` training samples
    per item: ``per_item - 1`` users of the item's own group and one of a random group."""
    rng = np.random.default_rng(seed)
    item_group = np.arange(n_items) % n_groups
    tree = Tree.from_ordered_items(rng.permutation(n_items), arity)
    targets = np.repeat(np.arange(n_items), per_item)
    user_group = item_group[targets].copy()
    noisy = np.arange(len(targets)) % per_item == 0
    user_group[noisy] = rng.integers(0, n_groups, noisy.sum())
    history = user_group  # item g belongs to group g: a one-item history names the group
    calls: list[np.ndarray] = []

    def features(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(np.asarray(index).copy())
        return history[index][:, None], np.zeros((len(index), 1), dtype=np.int64)

    return tree, item_group, targets, features, calls


def _group_node(tree: Tree, level: int) -> np.ndarray:
    """(n_items,) the ancestor at ``level`` of every item 0..n-1, as a rank in that level."""
    return (
        tree.ancestors(tree.item_to_leaf(np.arange(tree.n_items)))[:, level]
        - (tree.level_offsets[level])
    )


def _assert_valid(new: Tree, old: Tree) -> None:
    """Every item at exactly one leaf, the old tree's shape, balanced."""
    assert np.array_equal(np.sort(new.leaf_items), np.sort(old.leaf_items))
    assert len(np.unique(new.leaf_items)) == new.n_items
    assert np.array_equal(new.parent, old.parent)
    assert is_balanced(new)
    depths = new.level[new.leaf_nodes]
    assert depths.max() - depths.min() <= 1
    counts = subtree_leaf_counts(new)
    assert counts[0] == new.n_items


@pytest.mark.parametrize(
    ("n_items", "arity", "n_groups", "gap"),
    [
        (64, 2, 4, 3),  # complete binary tree, one step covers the group level
        (64, 2, 4, 1),  # one level per step
        (100, 2, 4, 2),  # near-complete: leaves on two levels
        (81, 3, 9, 2),  # ternary
    ],
)
def test_recovers_the_groups_the_model_prefers(n_items, arity, n_groups, gap) -> None:
    tree, item_group, targets, features, _ = _toy(n_items, arity, n_groups)
    level = int(round(np.log(n_groups) / np.log(arity)))
    model = GroupScorer(tree, item_group, level)
    assert tree_purity(tree, item_group)[level] < 0.6  # the random start mixes the groups

    new = learn_tree(model, tree, targets, features, gap=gap, samples_per_item=0, seed=0)

    _assert_valid(new, tree)
    assert tree_purity(new, item_group)[level] == 1.0
    # not only pure: group g sits under exactly the node its users like
    assert np.array_equal(_group_node(new, level), item_group)
    before = tree_log_likelihood(model, tree, targets, features)
    after = tree_log_likelihood(model, new, targets, features)
    assert after > before


def test_is_deterministic_for_a_seed_and_the_cap_draws_by_seed() -> None:
    tree, item_group, targets, features, _ = _toy(96, 2, 4, per_item=9)
    model = GroupScorer(tree, item_group, 2)
    runs = [
        learn_tree(model, tree, targets, features, gap=2, samples_per_item=3, seed=s)
        for s in (5, 5, 6)
    ]
    assert runs[0] == runs[1]
    for new in runs:
        _assert_valid(new, tree)
        assert np.array_equal(_group_node(new, 2), item_group)


def test_scores_at_most_the_cap_of_samples_per_item() -> None:
    tree, item_group, targets, features, calls = _toy(64, 2, 4, per_item=10)
    model = GroupScorer(tree, item_group, 2)
    learn_tree(model, tree, targets, features, gap=3, samples_per_item=4, seed=1)
    seen = np.unique(np.concatenate(calls))
    per_item = np.bincount(targets[seen], minlength=64)
    assert np.all(per_item == 4)  # every item has 10 samples: exactly 4 drawn, the same per step
    assert len(calls) > 0


def test_items_without_samples_keep_a_valid_place() -> None:
    tree, item_group, targets, features, _ = _toy(100, 2, 4)
    model = GroupScorer(tree, item_group, 2)
    cold = np.arange(0, 100, 7)  # 15 items never a target
    keep = ~np.isin(targets, cold)
    index = np.flatnonzero(keep)

    def some_features(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return features(index[i])

    new = learn_tree(model, tree, targets[keep], some_features, gap=3, samples_per_item=0)
    _assert_valid(new, tree)
    warm = np.setdiff1d(np.arange(100), cold)
    assert np.array_equal(_group_node(new, 2)[warm], item_group[warm])


def test_without_any_sample_the_tree_is_unchanged() -> None:
    tree, item_group, _, features, calls = _toy(100, 2, 4)
    model = GroupScorer(tree, item_group, 2)
    new = learn_tree(model, tree, np.zeros(0, dtype=np.int64), features, gap=2)
    assert new == tree
    assert calls == []


def test_restores_the_model_mode_and_checks_the_gap() -> None:
    tree, item_group, targets, features, _ = _toy(32, 2, 4)
    model = GroupScorer(tree, item_group, 2).train()
    learn_tree(model, tree, targets, features, gap=2)
    assert model.training
    with pytest.raises(ValueError, match="slots per step"):
        learn_tree(model, tree, targets, features, gap=int(np.log2(MAX_SLOTS)) + 1)
    with pytest.raises(ValueError, match="gap must be >= 1"):
        learn_tree(model, tree, targets, features, gap=0)
    with pytest.raises(KeyError):
        learn_tree(model, tree, np.array([1000]), features)


def test_tiny_trees() -> None:
    model = GroupScorer(Tree.from_ordered_items(np.arange(3), 2), np.arange(3) % 2, 1)
    for n in (1, 2, 3):
        tree = Tree.from_ordered_items(np.arange(n)[::-1], 2)
        targets = np.arange(n)

        def features(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return i[:, None] % 3, np.zeros((len(i), 1), dtype=np.int64)

        new = learn_tree(model, tree, targets, features, gap=3)
        _assert_valid(new, tree)


# ----------------------------------------------------------------------------- stage and CLI
@pytest.fixture(scope="module")
def trained_root(tmp_path_factory) -> Path:
    """A tiny prepared root with the category tree and a one-epoch round-0 model."""
    from tiny import TINY

    from tdm.cli import run

    root = tmp_path_factory.mktemp("jtm-root")
    sets = [a for s in [*TINY, "train.epochs=1"] for a in ("--set", s)]
    for command in (["prepare"], ["init-tree"], ["train", "--round", "0"]):
        assert run([*command, "--root", str(root), *sets]) == 0
    return root


def _sets(*extra: str) -> list[str]:
    from tiny import TINY

    return [a for s in [*TINY, *extra] for a in ("--set", s)]


def test_cli_relearn_tree_with_jtm(trained_root: Path, capsys) -> None:
    from tdm.checkpoint import load_model_dir
    from tdm.cli import run

    capsys.readouterr()
    argv = ["relearn-tree", "--round", "0", "--root", str(trained_root)]
    assert run([*argv, *_sets("tree.learner=jtm", "tree.jtm_gap=2")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["learner"] == "jtm" and report["samples_used"] > 0
    new = Tree.load(trained_root / "trees" / "round_1.tree")
    _, old = load_model_dir(trained_root / "models" / "round_0")
    _assert_valid(new, old)
    assert 0.0 < moved_fraction(old, new) <= 1.0


def test_stage_writes_atomically_and_keeps_kmeans(trained_root: Path, tmp_path: Path) -> None:
    from tiny import TINY

    from tdm import stages
    from tdm.config import ConfigError, load_config
    from tdm.paths import Paths

    paths = Paths(trained_root)
    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml", TINY)
    jtm = load_config(
        Path(__file__).resolve().parents[1] / "params.yaml", [*TINY, "tree.learner=jtm"]
    )
    out = tmp_path / "trees" / "round_1.tree"
    with pytest.raises(FileNotFoundError):  # a missing model folder: nothing written
        stages.relearn_tree(jtm, paths.embeddings(0), out, tmp_path / "none", paths.prepared)
    assert not out.exists() and not any(p.is_file() for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match="needs the round's model"):
        stages.relearn_tree(jtm, paths.embeddings(0), out)

    report = stages.relearn_tree(jtm, paths.embeddings(0), out, paths.model(0), paths.prepared)
    first = Tree.load(out)
    assert report["n_items"] == first.n_items and [f.name for f in out.parent.iterdir()] == [
        out.name
    ]
    stages.relearn_tree(jtm, paths.embeddings(0), out, paths.model(0), paths.prepared)
    assert Tree.load(out) == first  # deterministic through the stage too

    # kmeans (the default) needs no model: the embeddings alone, as before
    stages.export_embeddings(paths.model(0), tmp_path / "emb.npy")
    kmeans = stages.relearn_tree(cfg, tmp_path / "emb.npy", out)
    assert "learner" not in kmeans and Tree.load(out) != first


class SideScorer(nn.Module):
    """Users of item i like the root's left child by ``s[i]`` and its right child by
    ``-s[i]``; every other node is neutral (logit 0)."""

    def __init__(self, tree: Tree, strength: np.ndarray) -> None:
        super().__init__()
        rows = tree.embedding_rows()
        self.left, self.right = int(rows[1]), int(rows[2])
        self.register_buffer("strength", torch.as_tensor(strength, dtype=torch.float32))

    def user_state(self, hist: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        return self.strength[hist[:, -1]]

    def score(self, state: torch.Tensor, node_rows: torch.Tensor) -> torch.Tensor:
        side = (node_rows == self.left).float() - (node_rows == self.right).float()
        return side * state[:, None]


def _one_sample_each(n: int):
    def features(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return index[:, None] % n, np.zeros((len(index), 1), dtype=np.int64)

    return features


@pytest.mark.parametrize("gap", [1, 2, 3])
def test_rebalancing_keeps_the_items_that_need_the_contested_side_most(gap: int) -> None:
    # every item prefers the left half, by different strengths; the deeper levels are neutral,
    # so the slots under the left child tie: the left half must still get the strongest items
    n = 16
    strength = np.random.default_rng(1).permutation(np.arange(1, n + 1)).astype(np.float32)
    tree = Tree.from_ordered_items(np.arange(n), 2)
    model = SideScorer(tree, strength)
    new = learn_tree(model, tree, np.arange(n), _one_sample_each(n), gap=gap)
    _assert_valid(new, tree)
    left = _group_node(new, 1) == 0
    assert set(np.flatnonzero(left)) == set(np.argsort(-strength)[: n // 2])


def test_one_step_reaches_the_brute_force_optimum() -> None:
    # 8 items, depth 3: one step (gap 2) decides levels 1 and 2; every arrangement of the items
    # over the leaves is scored from each item's summed log-probabilities of every node
    from itertools import permutations

    from tdm.config import ModelConfig
    from tdm.model import build_model

    n = 8
    tree = Tree.from_ordered_items(np.arange(n), 2)
    model = build_model(ModelConfig(name="dnn", hidden=[8]), tree.n_nodes, 2, seed=3).eval()
    rng = np.random.default_rng(3)
    targets = rng.integers(0, n, 40)
    history = rng.integers(0, n, (40, 4))

    def features(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return history[index], np.zeros((len(index), 4), dtype=np.int64)

    new = learn_tree(model, tree, targets, features, gap=2)
    got = tree_log_likelihood(model, new, targets, features)

    with torch.inference_mode():
        state = model.user_state(*map(torch.as_tensor, features(np.arange(40))))
        rows = torch.as_tensor(tree.embedding_rows()).expand(40, -1)
        log_p = torch.nn.functional.logsigmoid(model.score(state, rows)).numpy()  # (40, nodes)
    per_item = np.zeros((n, tree.n_nodes))
    np.add.at(per_item, targets, log_p)  # (items, nodes) summed over each item's samples
    inner = tree.ancestors(tree.leaf_nodes)[:, 1:-1]  # (leaves, levels 1..2) in leaf order
    orders = np.array(list(permutations(range(n))))  # (8!, leaves) item at each leaf
    totals = per_item[orders[:, :, None], inner[None]].sum((1, 2))  # (P,)
    assert got == pytest.approx(totals.max() / len(targets), abs=1e-6)
    assert got > tree_log_likelihood(model, tree, targets, features)


def test_a_capped_item_weighs_as_all_its_samples() -> None:
    # items 0..7 like the left side equally per sample, but item 7 has 50 samples and the
    # others 2; with a cap of 2 its sums are scaled back up: it must win a left place over
    # items with fewer samples, as the objective (a sum over all samples) says
    n = 8
    tree = Tree.from_ordered_items(np.arange(n), 2)
    model = SideScorer(tree, np.full(n, 2.0, dtype=np.float32))
    counts = np.array([2, 2, 2, 2, 2, 2, 2, 50])
    targets = np.repeat(np.arange(n), counts)

    def features(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return targets[index][:, None], np.zeros((len(index), 1), dtype=np.int64)

    for seed in range(3):
        new = learn_tree(model, tree, targets, features, gap=1, samples_per_item=2, seed=seed)
        assert _group_node(new, 1)[7] == 0


def test_prefect_task_writes_what_the_stage_writes(trained_root: Path, tmp_path: Path) -> None:
    from tiny import TINY

    from tasks.steps import relearn_task
    from tdm import stages
    from tdm.config import load_config
    from tdm.paths import Paths

    paths = Paths(trained_root)
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "params.yaml", [*TINY, "tree.learner=jtm"]
    )
    out = relearn_task.fn(cfg, str(trained_root), 0, str(paths.embeddings(0)))
    assert Path(out) == paths.tree(1)
    stages.relearn_tree(
        cfg, paths.embeddings(0), tmp_path / "t.tree", paths.model(0), paths.prepared
    )
    assert Tree.load(out) == Tree.load(tmp_path / "t.tree")
