"""The C beam search (``tdm.native``, ``beam_search(..., backend="native")``) against torch's."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tdm.native
from tdm.config import ModelConfig
from tdm.model import build_model
from tdm.retrieval import beam_search
from tdm.serving.engine import search_backend
from tdm.tree import Tree

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = 4


def uneven_tree() -> Tree:
    """Leaves at depths 1 to 4; level 1 has 3 nodes (as in test_retrieval)."""
    parent = [-1, 0, 0, 0, 2, 2, 3, 3, 5, 5, 6, 6, 10, 10]
    node_item = [-1, 0, -1, -1, 1, -1, -1, 2, 3, 4, -1, 5, 6, 7]
    return Tree(np.array(parent), np.array(node_item))


def trained_looking(name: str, tree: Tree, node_bias: bool = False, seed: int = 0):
    """A model with every folded part away from its initial value (BatchNorm statistics and
    affine, PReLU slopes, larger embeddings, node biases), in eval mode."""
    model = build_model(ModelConfig(name=name, node_bias=node_bias), tree.n_nodes, WINDOWS, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(1 + torch.randn(m.num_features, generator=gen) * 0.2)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            if isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.3 + 0.05)
        model.embedding.weight.copy_(torch.randn(model.embedding.weight.shape, generator=gen) / 2)
        if model.node_bias is not None:
            model.node_bias.weight.copy_(torch.randn(model.node_bias.weight.shape, generator=gen))
    return model.eval()


def histories(n_users: int, n_items: int, length: int, seed: int):
    """(U, L) histories, left-padded with -1 for a third of the users."""
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, n_items, (n_users, length))
    windows = np.sort(rng.integers(0, WINDOWS, (n_users, length)), axis=1)[:, ::-1].copy()
    for u in range(0, n_users, 3):
        cut = rng.integers(1, length)
        hist[u, :cut] = -1
        windows[u, :cut] = -1
    return hist, windows


def exclusions(n_users: int, n_items: int, seed: int):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, n_items // 3 + 1, n_users)
    rows = [rng.choice(n_items, size, replace=False) for size in sizes]
    offsets = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)
    return np.concatenate(rows).astype(np.int64), offsets


def assert_same_ranking(got, want, tol=1e-5):
    """Equal item lists, except that items whose scores differ by less than ``tol`` (rounding)
    may swap places; equal scores position by position to ``tol``."""
    np.testing.assert_allclose(got[1], want[1], rtol=tol, atol=tol)
    rows, cols = np.nonzero(got[0] != want[0])
    assert len(rows) <= max(2, got[0].size // 100), f"{len(rows)} of {got[0].size} differ"
    for r, c in zip(rows, cols, strict=True):
        where = np.flatnonzero(want[0][r] == got[0][r, c])
        score = want[1][r, where[0]] if len(where) else got[1][r, c]
        assert abs(score - want[1][r, c]) <= tol, (r, c, got[0][r], want[0][r])


def assert_same_search(model, tree, hist, windows, k, exclude=None):
    want = beam_search(model, tree, hist, windows, k, exclude=exclude, with_stats=True)
    got = beam_search(
        model, tree, hist, windows, k, exclude=exclude, with_stats=True, backend="native"
    )
    assert_same_ranking(got, want)
    np.testing.assert_array_equal(got[2].nodes_scored_per_user, want[2].nodes_scored_per_user)
    return got


TREES = {
    "binary": lambda: Tree.from_ordered_items(np.random.default_rng(1).permutation(300), arity=2),
    "ternary": lambda: Tree.from_ordered_items(np.random.default_rng(2).permutation(250), arity=3),
    "uneven": uneven_tree,
}


@pytest.mark.parametrize("name", ["attention_dnn", "dnn", "product_dnn"])
@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_native_search_equals_torch_search(name, tree_name):
    """Items, scores (to rounding) and nodes scored equal torch's, for every built-in model, on
    trees with leaves at several depths, at k from 1 to above the corpus size, with and without
    excluded items, for users with padded histories."""
    tree = TREES[tree_name]()
    model = trained_looking(name, tree, seed=3)
    hist, windows = histories(24, tree.n_items, 11, seed=4)
    exclude = exclusions(24, tree.n_items, seed=5)
    for k in (1, 4, 20, tree.n_items + 5):
        assert_same_search(model, tree, hist, windows, k)
        items, _, _ = assert_same_search(model, tree, hist, windows, k, exclude)
        seen = [set(exclude[0][exclude[1][u] : exclude[1][u + 1]]) for u in range(len(hist))]
        assert all(not set(row[row >= 0]) & seen[u] for u, row in enumerate(items))


@pytest.mark.parametrize("name", ["attention_dnn", "dnn", "product_dnn"])
def test_native_search_with_node_biases_and_a_dense_exclusion(name):
    tree = TREES["binary"]()
    model = trained_looking(name, tree, node_bias=True, seed=6)
    hist, windows = histories(10, tree.n_items, 7, seed=7)
    dense = np.zeros((10, tree.n_items), dtype=bool)
    dense[:, :50] = True
    assert_same_search(model, tree, hist, windows, 10, dense)


def test_one_user_at_a_time_equals_the_batch():
    """A user's C result does not depend on the other users of its batch (the service's
    batched answers equal unbatched ones)."""
    tree = TREES["binary"]()
    model = trained_looking("attention_dnn", tree, seed=8)
    hist, windows = histories(9, tree.n_items, 13, seed=9)
    batch = beam_search(model, tree, hist, windows, 10, backend="native")
    for u in range(len(hist)):
        alone = beam_search(model, tree, hist[u : u + 1], windows[u : u + 1], 10, backend="native")
        np.testing.assert_array_equal(alone[0][0], batch[0][u])
        np.testing.assert_allclose(alone[1][0], batch[1][u], rtol=1e-5, atol=1e-6)


def test_changed_weights_are_seen():
    """The packed weights are rebuilt when a weight changes in place (a training step)."""
    tree = TREES["binary"]()
    model = trained_looking("dnn", tree, seed=10)
    hist, windows = histories(6, tree.n_items, 5, seed=11)
    before = assert_same_search(model, tree, hist, windows, 5)
    with torch.no_grad():
        model.head.out.bias += 3.0
        model.embedding.weight.mul_(-1)
    after = assert_same_search(model, tree, hist, windows, 5)
    assert not np.array_equal(before[0], after[0])


def test_auto_uses_torch_where_c_does_not_apply_and_native_says_why():
    tree = TREES["binary"]()
    model = trained_looking("dnn", tree, seed=12)
    hist, windows = histories(4, tree.n_items, 5, seed=13)
    want = beam_search(model, tree, hist, windows, 5, ranking="path")
    got = beam_search(model, tree, hist, windows, 5, ranking="path", backend="auto")
    np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(ValueError, match="ranks by node, not 'path'"):
        beam_search(model, tree, hist, windows, 5, ranking="path", backend="native")
    with pytest.raises(ValueError, match="does not return the levels"):
        beam_search(model, tree, hist, windows, 5, return_levels=True, backend="native")
    with pytest.raises(ValueError, match="backend 'fast' is not one of"):
        beam_search(model, tree, hist, windows, 5, backend="fast")
    with pytest.raises(IndexError, match="outside the embedding table"):
        beam_search(model, tree, hist + tree.n_nodes, windows, 5, backend="native")
    double = trained_looking("dnn", tree, seed=12).double()
    with pytest.raises(ValueError, match="float32 weights"):
        beam_search(double, tree, hist, windows, 5, backend="native")
    assert search_backend(model, torch.device("cpu"), "auto") == "native"
    assert search_backend(double, torch.device("cpu"), "auto").startswith("torch (")
    assert search_backend(model, torch.device("cpu"), "torch") == "torch"


def test_the_library_is_compiled_into_its_cache_once(tmp_path):
    """A fresh cache folder gets one compiled library; a second process reuses it; with
    TDM_NATIVE=0 the service's ``auto`` falls back to torch and says why."""
    script = (
        "import tdm.native as n, sys; ok = n.available(); "
        "print(ok, n.reason()); sys.exit(0 if ok else 3)"
    )
    env = {**os.environ, "TDM_NATIVE_CACHE": str(tmp_path / "cache")}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(list((tmp_path / "cache").glob("beam-*.so"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))
    off = subprocess.run([sys.executable, "-c", script], env={**env, "TDM_NATIVE": "0"},
                         cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert off.returncode == 3 and "TDM_NATIVE=0" in off.stdout


def test_available_in_this_session():
    """The test machines have a C compiler (.ci/run installs one): the C path is tested, not
    skipped."""
    assert tdm.native.available(), tdm.native.reason()


@pytest.mark.parametrize("name", ["attention_dnn", "product_dnn"])
def test_a_model_in_training_mode_is_searched_in_eval_mode_and_left_in_its_mode(name):
    tree = TREES["binary"]()
    model = trained_looking(name, tree, seed=14).train()
    hist, windows = histories(5, tree.n_items, 6, seed=15)
    tdm.native._ENTRIES.pop(model, None)  # pack while in training mode
    assert_same_search(model, tree, hist, windows, 5)
    assert all(m.training for m in model.modules())
