"""Training (Eq. 4), checkpoints, exact resume and warm start."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tdm.checkpoint import (
    Checkpointer,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_model,
)
from tdm.config import Config, ConfigError, ModelConfig, TrainConfig
from tdm.model import build_model
from tdm.sampler import LayerwiseSampler, negatives_for_levels
from tdm.train import (
    _batches,
    _prefetch,
    cap_per_user,
    masked_bce,
    resolve_device,
    train,
    warm_start,
)
from tdm.tree import Tree

N_ITEMS, CLUSTER, L, W = 64, 8, 8, 2
SMALL = dict(embedding_dim=8, attention_hidden=8, hidden=[32, 16, 8])


class ClusterSamples:
    """Users whose history lies in one cluster of 8 consecutive items (= a level-3 subtree of
    ``Tree.from_ordered_items(range(64), 2)``); the target is another item of that cluster."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        cluster = rng.integers(0, N_ITEMS // CLUSTER, n)
        self.hist = cluster[:, None] * CLUSTER + rng.integers(0, CLUSTER, (n, L))
        self.windows = rng.integers(0, W, (n, L))
        pad = np.arange(L)[None, :] < rng.integers(0, 4, n)[:, None]
        self.hist[pad] = -1
        self.windows[pad] = -1
        self.targets = cluster * CLUSTER + rng.integers(0, CLUSTER, n)
        self.n_samples = n

    def batch(self, positions: np.ndarray):
        return self.hist[positions], self.windows[positions], self.targets[positions]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree.from_ordered_items(np.arange(N_ITEMS), arity=2)


def make(tree: Tree, name: str = "attention_dnn", seed: int = 0):
    model = build_model(ModelConfig(name=name, **SMALL), tree.n_nodes, W, seed=seed)
    sampler = LayerwiseSampler(tree, negatives_for_levels(tree.level_sizes, 20), seed=0)
    return model, sampler


def config(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=64, lr=0.01, device="cpu", progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
@pytest.mark.parametrize("name", ["attention_dnn", "dnn", "product_dnn"])
def test_training_learns_the_cluster_structure(tree, name, optimizer):
    model, sampler = make(tree, name)
    result = train(model, tree, ClusterSamples(1536, seed=0), sampler, config(optimizer=optimizer))
    assert len(result.losses) == 3 and result.losses[-1] < 0.8 * result.losses[0]
    assert result.stats[-1]["pairs_per_s"] > 0 and result.device == "cpu"

    test = ClusterSamples(300, seed=99)
    rows = torch.as_tensor(tree.embedding_rows())
    model.eval()
    with torch.no_grad():
        state = model.user_state(torch.as_tensor(test.hist), torch.as_tensor(test.windows))
        level = 3  # the 8 cluster nodes: the true one must come first
        nodes = np.arange(tree.level_offsets[level], tree.level_offsets[level + 1])
        logits = model.score(state, rows[nodes].expand(test.n_samples, -1))
    truth = tree.ancestors(tree.item_to_leaf(test.targets))[:, level]
    top = nodes[logits.argmax(1).numpy()]
    assert (top == truth).mean() > 0.8  # random: 1/8

    # the true ancestors outrank the sampled random nodes at every level
    nodes, labels, mask = LayerwiseSampler(tree, sampler.negatives_per_level, seed=5).sample(
        test.targets
    )
    with torch.no_grad():
        logits = model.score(state, rows[torch.as_tensor(nodes)]).numpy()
    pos, neg = logits[mask & (labels == 1)], logits[mask & (labels == 0)]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc > 0.85


def checkpointer(path, name="attention_dnn", **fingerprint) -> Checkpointer:
    return Checkpointer(path, {"run": "a", **fingerprint}, ModelConfig(name=name, **SMALL))


class Killed(Exception):
    pass


class DiesInEpoch(ClusterSamples):
    """Raises while serving a batch of epoch ``die_in`` (0-based), as a kill mid-epoch would."""

    def __init__(self, n: int, seed: int, die_in: int) -> None:
        super().__init__(n, seed)
        self.epochs_started, self.die_in, self._seen = 0, die_in, set()

    def batch(self, positions):
        if len(self._seen) == self.n_samples:  # every sample served: a new epoch began
            self.epochs_started += 1
            self._seen = set()
        self._seen.update(positions.tolist())
        if self.epochs_started == self.die_in:
            raise Killed
        return super().batch(positions)


class Recorder:
    """An epoch callback with state, like the validation monitor."""

    def __init__(self):
        self.seen: list[int] = []

    def __call__(self, epoch, stats):
        self.seen.append(epoch)

    def state_dict(self):
        return {"seen": list(self.seen)}

    def load_state_dict(self, state):
        self.seen = list(state["seen"])


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
def test_resume_equals_uninterrupted_bit_for_bit(tree, tmp_path, optimizer):
    cfg = config(epochs=3, batch_size=50, optimizer=optimizer)

    full, sampler = make(tree)
    uninterrupted = train(full, tree, ClusterSamples(400, seed=1), sampler, cfg)

    first, sampler = make(tree)
    recorder = Recorder()
    with pytest.raises(Killed):  # dies in the second epoch, after epoch 1's checkpoint
        train(
            first,
            tree,
            DiesInEpoch(400, seed=1, die_in=1),
            sampler,
            cfg,
            checkpointer=checkpointer(tmp_path),
            callback=recorder,
        )
    assert read_checkpoint(tmp_path / "last.pt")["epoch"] == 1

    resumed, sampler = make(tree, seed=123)  # different init: everything comes from last.pt
    recorder = Recorder()
    result = train(
        resumed,
        tree,
        ClusterSamples(400, seed=1),
        sampler,
        cfg,
        checkpointer=checkpointer(tmp_path),
        callback=recorder,
    )
    assert recorder.seen == [0, 1, 2]  # the callback's state came back with the weights
    assert result.losses == uninterrupted.losses
    for (key, a), (_, b) in zip(
        full.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key


def test_a_checkpoint_of_another_run_is_not_resumed(tree, tmp_path, caplog):
    """Another fingerprint (say train.lr changed after a kill): start fresh and say what
    differs; the run then equals a run that never had a checkpoint."""
    with pytest.raises(Killed):
        model, sampler = make(tree)
        train(
            model,
            tree,
            DiesInEpoch(300, seed=1, die_in=1),
            sampler,
            config(epochs=2, lr=0.01),
            checkpointer=checkpointer(tmp_path, lr=0.01),
        )
    assert (tmp_path / "last.pt").exists()

    fresh, sampler = make(tree)
    expected = train(fresh, tree, ClusterSamples(300, seed=1), sampler, config(epochs=2, lr=0.001))
    model, sampler = make(tree)
    with caplog.at_level("WARNING", logger="tdm.checkpoint"):
        result = train(
            model,
            tree,
            ClusterSamples(300, seed=1),
            sampler,
            config(epochs=2, lr=0.001),
            checkpointer=checkpointer(tmp_path, lr=0.001),
        )
    assert "written by another run (lr 0.01 -> 0.001); starting fresh" in caplog.text
    assert len(result.losses) == 2 and result.losses == expected.losses
    assert read_checkpoint(tmp_path / "last.pt")["fingerprint"]["lr"] == 0.001


def test_checkpoints_files_and_load_checkpoint(tree, tmp_path):
    data = ClusterSamples(200, seed=2)
    model, sampler = make(tree, "dnn")
    train(model, tree, data, sampler, config(epochs=2), checkpointer=checkpointer(tmp_path, "dnn"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch_1.pt", "epoch_2.pt", "last.pt"]  # no temp files left behind
    assert (tmp_path / "last.pt").samefile(tmp_path / "epoch_2.pt")
    ckpt = read_checkpoint(tmp_path / "last.pt")
    for key in ("model_config", "n_embeddings", "time_windows", "optimizer", "fingerprint"):
        assert key in ckpt
    assert "rng" not in ckpt and "train_config" not in ckpt  # dead fields are gone
    assert ckpt["model_name"] == "dnn" and ckpt["epoch"] == 2 and len(ckpt["losses"]) == 2

    loaded = load_checkpoint(tmp_path / "last.pt")
    assert not loaded.training
    model.eval()
    hist, windows = torch.as_tensor(data.hist[:20]), torch.as_tensor(data.windows[:20])
    node_rows = torch.arange(30).reshape(1, 30).expand(20, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(hist, windows, node_rows), model(hist, windows, node_rows)
        )

    save_model(model, tmp_path / "model.pt", Config(model=ModelConfig(name="dnn", **SMALL)))
    again = load_checkpoint(tmp_path / "model.pt")
    assert "config" in read_checkpoint(tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(again(hist, windows, node_rows), model(hist, windows, node_rows))

    torch.save({"x": 1}, tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="junk.pt: not a tdm model file"):
        read_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable model file"):
        read_checkpoint(tmp_path / "garbage.pt")


def test_a_model_file_never_chooses_the_code_it_imports(tree, tmp_path, monkeypatch):
    """A crafted model.pt naming a module must not import it unless the caller's own params name
    the same class."""
    model, _ = make(tree, "dnn")
    save_model(model, tmp_path / "model.pt", ModelConfig(name="dnn", **SMALL))
    ckpt = read_checkpoint(tmp_path / "model.pt")
    ckpt["model_config"]["name"] = ckpt["model_name"] = "this:Anything"
    torch.save(ckpt, tmp_path / "evil.pt")
    import sys

    monkeypatch.delitem(sys.modules, "this", raising=False)
    with pytest.raises(CheckpointError, match="custom model class 'this:Anything'"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "this" not in sys.modules  # `import this` never ran


def test_a_device_this_machine_lacks_is_a_config_error():
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"


def test_sparse_adam_moves_only_the_rows_of_the_step(tree, tmp_path):
    """A step with sparse gradients moves exactly the embedding rows its batch looked up; dense
    Adam, whose moments carry over, also moves rows that only the step before touched."""
    data = ClusterSamples(8, seed=4)
    negatives = [0] * (tree.depth - 1) + [2]
    rows = tree.embedding_rows()

    def looked_up(sampler, epoch):  # the trainer's draws: its sample order, its sampler seed
        order = np.random.default_rng([0, epoch]).permutation(len(data.targets))
        sampler.reseed(0, epoch)
        nodes, _, mask = sampler.sample(data.targets[order])
        return set(data.hist[data.hist >= 0].tolist()) | set(rows[nodes[mask]].tolist())

    for optimizer in ("sparse_adam", "adam"):
        model, _ = make(tree, "dnn")
        sampler = LayerwiseSampler(tree, negatives, seed=0)
        ckpt = checkpointer(tmp_path / optimizer, "dnn")
        cfg = config(epochs=1, batch_size=8, optimizer=optimizer, bucket_by_length=False)
        train(model, tree, data, sampler, cfg, checkpointer=ckpt)  # step 1
        after_first = model.embedding.weight.detach().clone()
        cfg = dataclasses.replace(cfg, epochs=2)
        train(model, tree, data, sampler, cfg, checkpointer=ckpt)  # step 2, resumed
        moved = (model.embedding.weight.detach() != after_first).any(1).numpy()
        moved = set(np.flatnonzero(moved).tolist())
        second = looked_up(sampler, 1)
        assert model.embedding.sparse == (optimizer == "sparse_adam")
        assert len(looked_up(sampler, 0) - second) > 5  # rows only the first step touched
        if optimizer == "sparse_adam":
            assert moved == second
        else:
            assert moved > second


def test_max_steps_bounds_the_run_across_epochs(tree):
    model, sampler = make(tree, "dnn")
    result = train(
        model, tree, ClusterSamples(500, 3), sampler, config(epochs=5, batch_size=64, max_steps=10)
    )
    assert [s["steps"] for s in result.stats] == [8, 2]  # 500 samples: 8 batches, then 2
    assert result.stats[1]["samples"] == 2 * 64


def test_max_samples_per_epoch_caps_the_epoch(tree):
    model, sampler = make(tree, "product_dnn")
    # 129 = 2 * 64 + 1: the lone last sample joins the batch before (BatchNorm over users)
    result = train(
        model, tree, ClusterSamples(500, 3), sampler, config(epochs=1, max_samples_per_epoch=129)
    )
    assert result.stats[0]["samples"] == 129


def test_cap_per_user_keeps_the_first_samples_of_each_user_in_order():
    users = np.array([0, 0, 0, 1, 2, 2, 2, 2])  # user of samples 0..7
    order = np.array([7, 1, 4, 0, 3, 2, 6, 5])
    kept = cap_per_user(order, users, 2)
    np.testing.assert_array_equal(kept, [7, 1, 4, 0, 3])  # 2 of user 0, 1 of user 1, 2 of user 2
    assert len(cap_per_user(order, users, 10)) == len(order)


def test_max_samples_per_user_caps_every_user_per_epoch(tree):
    source = ClusterSamples(500, 3)
    source.users = np.arange(500) % 20  # 25 samples per user
    model, sampler = make(tree, "product_dnn")
    result = train(model, tree, source, sampler, config(epochs=2, max_samples_per_user=5))
    assert [s["samples"] for s in result.stats] == [100, 100]


def test_history_dropout_hides_behaviours_but_never_padding_or_targets(tree):
    source = ClusterSamples(256, 3)
    _, sampler = make(tree)
    order = np.arange(256)
    plain = next(_batches(source, sampler, order, 256))
    dropped = next(_batches(source, sampler, order, 256, 0.5, np.random.default_rng(0)))
    hist, windows = plain[0].numpy(), dropped[0].numpy()
    hidden = (hist >= 0) & (windows < 0)
    assert 0.4 < hidden.sum() / (hist >= 0).sum() < 0.6
    assert np.all(windows[~hidden] == hist[~hidden]) and np.all(dropped[1].numpy()[hidden] == -1)


def test_masked_bce_is_the_mean_over_valid_pairs():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    p = torch.sigmoid(logits)
    each = -(labels * p.log() + (1 - labels) * (1 - p).log())  # Eq. 4
    torch.testing.assert_close(masked_bce(logits, labels, mask), each[mask].mean())


def test_warm_start_keeps_items_and_sets_internal_nodes_to_leaf_means():
    n = 20
    old_tree = Tree.from_ordered_items(np.random.default_rng(0).permutation(n), arity=2)
    new_tree = Tree.from_ordered_items(np.random.default_rng(1).permutation(n), arity=3)
    old = build_model(ModelConfig(**SMALL), old_tree.n_nodes, W, seed=0)
    new = build_model(ModelConfig(**SMALL), new_tree.n_nodes, W, seed=1)
    warm_start(new, old, old_tree, new_tree)

    old_emb, new_emb = old.embedding.weight.detach(), new.embedding.weight.detach()
    assert torch.equal(new_emb[:n], old_emb[:n])
    rows = new_tree.embedding_rows()
    path = new_tree.ancestors(new_tree.leaf_nodes)  # (n, depth+1)
    for v in np.flatnonzero(~new_tree.is_leaf):
        under = new_tree.leaf_items[(path == v).any(1)]
        torch.testing.assert_close(new_emb[rows[v]], old_emb[under].mean(0))
    for (key, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        if key != "embedding.weight":
            assert torch.equal(a, b), key


def test_prefetch_keeps_order_and_raises():
    assert list(_prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(_prefetch(broken()))
    early = _prefetch(iter(range(100)), depth=2)
    assert next(early) == 0
    early.close()  # the producer thread is released


def test_bucket_by_length_is_a_permutation_of_similar_length_batches():
    from tdm.train import bucket_by_length

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 70, size=5000)
    order = rng.permutation(5000)
    out = bucket_by_length(order, lengths, 50, np.random.default_rng(1), span=10)
    assert sorted(out.tolist()) == list(range(5000))
    spread = [np.ptp(lengths[out[i : i + 50]]) for i in range(0, 5000, 50)]
    random_spread = [np.ptp(lengths[order[i : i + 50]]) for i in range(0, 5000, 50)]
    assert np.mean(spread) < 0.25 * np.mean(random_spread)
    # deterministic for a generator seed, so a resumed epoch replays the same batches
    again = bucket_by_length(order, lengths, 50, np.random.default_rng(1), span=10)
    np.testing.assert_array_equal(out, again)


def test_warm_start_gives_internal_nodes_the_largest_bias_of_their_children():
    n = 20
    old_tree = Tree.from_ordered_items(np.random.default_rng(0).permutation(n), arity=2)
    new_tree = Tree.from_ordered_items(np.random.default_rng(1).permutation(n), arity=3)
    cfg = ModelConfig(**SMALL, node_bias=True)
    old = build_model(cfg, old_tree.n_nodes, W, seed=0)
    new = build_model(cfg, new_tree.n_nodes, W, seed=1)
    with torch.no_grad():
        old.node_bias.weight.normal_()
    warm_start(new, old, old_tree, new_tree)

    old_bias, bias = old.node_bias.weight[:, 0].detach(), new.node_bias.weight[:, 0].detach()
    assert torch.equal(bias[:n], old_bias[:n])
    rows = new_tree.embedding_rows()
    path = new_tree.ancestors(new_tree.leaf_nodes)  # (n, depth+1)
    for v in np.flatnonzero(~new_tree.is_leaf):
        under = new_tree.leaf_items[(path == v).any(1)]
        assert bias[rows[v]] == old_bias[under].max()
