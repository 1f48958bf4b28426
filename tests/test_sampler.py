"""Layer-wise sampler (Sec. 3.3, Eq. 4) and the HS variant's sibling negatives (Sec. 5.4)."""

from __future__ import annotations

import numpy as np
import pytest

from tdm.config import SamplerConfig
from tdm.sampler import LayerwiseSampler, negatives_for_levels
from tdm.tree import Tree


def columns(sampler: LayerwiseSampler):
    """(level, positive column, negative columns) for every level."""
    col = 0
    for j, n in enumerate(sampler.negatives_per_level, start=1):
        yield j, col, np.arange(col + 1, col + 1 + n)
        col += 1 + n


def uneven_tree() -> Tree:
    """root -> [a, leaf0]; a -> [b] (a single-node level); b -> [leaf1, leaf2]."""
    parent = np.array([-1, 0, 0, 1, 3, 3])
    node_item = np.array([-1, -1, 0, -1, 1, 2])
    return Tree(parent, node_item)


def test_positives_are_the_ancestors_never_the_root():
    tree = Tree.from_ordered_items(np.random.default_rng(0).permutation(50), arity=3)
    sampler = LayerwiseSampler(tree, negatives_for_levels(tree.level_sizes, 20), seed=0)
    targets = np.arange(50)
    nodes, labels, mask = sampler.sample(targets)
    assert nodes.shape == labels.shape == mask.shape == (50, sampler.width)
    assert nodes.dtype == np.int64 and labels.dtype == np.float32 and mask.dtype == bool
    path = tree.ancestors(tree.item_to_leaf(targets))
    assert not np.any((nodes == 0) & mask)  # the root is never sampled
    for j, pos, neg in columns(sampler):
        live = path[:, j] >= 0
        np.testing.assert_array_equal(mask[:, pos], live)
        np.testing.assert_array_equal(nodes[live, pos], path[live, j])
        assert np.all(labels[:, pos] == 1) and np.all(labels[:, neg] == 0)
    assert labels[mask].sum() == (path[:, 1:] >= 0).sum()


def test_negatives_never_hit_the_positive_and_stay_in_their_level():
    tree = Tree.from_ordered_items(np.arange(40), arity=2)
    sampler = LayerwiseSampler(tree, [1, 3, 7, 10, 10, 10], seed=1)
    targets = np.random.default_rng(0).integers(0, 40, size=2000)
    for _ in range(5):
        nodes, _, mask = sampler.sample(targets)
        for j, pos, neg in columns(sampler):
            lo, hi = tree.level_offsets[j], tree.level_offsets[j + 1]
            nj, mj = nodes[:, neg], mask[:, neg]
            assert np.all((nj[mj] >= lo) & (nj[mj] < hi))
            assert not np.any((nj == nodes[:, pos : pos + 1]) & mj)
            assert np.all(mj == mask[:, pos : pos + 1])


def test_negatives_are_roughly_uniform():
    tree = Tree.from_ordered_items(np.arange(16), arity=2)  # level 3 has 8 nodes
    sampler = LayerwiseSampler(tree, [1, 3, 20, 20], seed=2)
    targets = np.zeros(5000, dtype=np.int64)  # always the same positive
    nodes, _, _ = sampler.sample(targets)
    j, pos, neg = list(columns(sampler))[2]
    positive = nodes[0, pos]
    lo, hi = tree.level_offsets[j], tree.level_offsets[j + 1]
    counts = np.bincount(nodes[:, neg].ravel() - lo, minlength=hi - lo)
    assert counts[positive - lo] == 0
    others = np.delete(counts, positive - lo)
    expected = others.sum() / len(others)
    chi2 = ((others - expected) ** 2 / expected).sum()
    assert chi2 < 30  # 6 degrees of freedom; p(chi2 > 30) ~ 4e-5


def test_siblings_mode_draws_siblings():
    tree = Tree.from_ordered_items(np.arange(64), arity=4)  # 3 siblings everywhere
    targets = np.arange(64)
    for n, masked in [(2, 0), (3, 0), (5, 2)]:
        sampler = LayerwiseSampler(tree, [n] * tree.depth, mode="siblings", seed=3)
        nodes, labels, mask = sampler.sample(targets)
        for _, pos, neg in columns(sampler):
            p = nodes[:, pos]
            siblings = tree.children_of(tree.parent[p])  # (B, 4)
            nj, mj = nodes[:, neg], mask[:, neg]
            is_sib = (nj[:, :, None] == siblings[:, None, :]).any(-1) & (nj != p[:, None])
            assert np.all(is_sib[mj])
            assert np.all((~mj).sum(1) == masked)
            if n == 3:  # each sibling exactly once
                assert np.all(
                    np.sort(nj, 1) == np.sort(siblings[siblings != p[:, None]].reshape(-1, 3), 1)
                )


def test_tiny_levels_and_uneven_depths():
    tree = uneven_tree()
    assert tree.level_sizes.tolist() == [1, 2, 1, 2]
    for mode in ("random", "siblings"):
        sampler = LayerwiseSampler(tree, [3, 3, 3], mode=mode, seed=0)
        nodes, labels, mask = sampler.sample(np.array([0, 1, 2, 1]))
        level1, level2, level3 = [slice(c, c + 4) for c in (0, 4, 8)]
        # item 0 is a leaf at level 1: nothing below exists
        assert mask[0, level1][0] and not mask[0, level2].any() and not mask[0, level3].any()
        # level 2 has a single node: masked for everybody
        assert not mask[:, level2].any()
        # level 1 has 2 nodes: one distinct negative; with replacement in random mode
        assert np.all(mask[1:, 1:4] == (mode == "random" or np.array([True, False, False])))
        assert np.all(nodes[1:, 1][mask[1:, 1]] == 2)  # the other level-1 node (leaf0)
        assert np.all(nodes[1:, 0] == 1)
        # level 3: items 1 and 2 are siblings
        np.testing.assert_array_equal(nodes[1:, 8], [4, 5, 4])
        assert np.all(nodes[1:, 9][mask[1:, 9]] == [5, 4, 5][: mask[1:, 9].sum()])
        assert np.all(nodes[~mask] == 0)


def assert_same_seed_same_samples(tree, counts, targets, replacement):
    """Two samplers of one seed draw alike, also after the same ``reseed``; another reseed
    draws otherwise. Returns the first sampler (reseeded to (1, 2))."""
    a = LayerwiseSampler(tree, counts, seed=5, replacement=replacement)
    b = LayerwiseSampler(tree, counts, seed=5, replacement=replacement)
    np.testing.assert_array_equal(a.sample(targets)[0], b.sample(targets)[0])
    a.reseed(1, 2)
    b.reseed(1, 2)
    first = a.sample(targets)[0]
    np.testing.assert_array_equal(first, b.sample(targets)[0])
    b.reseed(1, 3)
    assert not np.array_equal(first, b.sample(targets)[0])
    return a


def test_same_seed_same_samples_and_reseed():
    tree = Tree.from_ordered_items(np.arange(30), arity=2)
    counts = negatives_for_levels(tree.level_sizes, 12)
    targets = np.arange(30)
    assert_same_seed_same_samples(tree, counts, targets, replacement=True)
    gen = LayerwiseSampler(tree, counts, seed=np.random.default_rng(0))
    assert isinstance(gen.seed, int)


def test_negatives_for_levels_sums_caps_and_grows_towards_leaves():
    sizes = [1, 2, 4, 8, 16, 32, 64, 128]
    counts = negatives_for_levels(sizes, 100)
    assert sum(counts) == 100 and len(counts) == 7
    assert all(1 <= c <= s - 1 for c, s in zip(counts, sizes[1:], strict=True))
    assert counts[0] == 1 and counts[-1] == max(counts)
    assert counts[3:] == sorted(counts[3:])
    # more than the tree can hold: every level capped
    assert negatives_for_levels(sizes, 10_000) == [s - 1 for s in sizes[1:]]
    # fewer than the number of levels: still exactly the total
    assert sum(negatives_for_levels(sizes, 3)) == 3
    assert negatives_for_levels(sizes, 0) == [0] * 7
    assert negatives_for_levels([1, 2, 1, 2], 6) == [1, 0, 1]


def test_from_config_and_bad_arguments():
    tree = Tree.from_ordered_items(np.arange(20), arity=2)
    sampler = LayerwiseSampler.from_config(tree, SamplerConfig(total_negatives=30))
    assert sum(sampler.negatives_per_level) == 30
    explicit = [1] * tree.depth
    sampler = LayerwiseSampler.from_config(tree, SamplerConfig(negatives_per_level=explicit))
    assert sampler.negatives_per_level == explicit
    with pytest.raises(ValueError, match="levels"):
        LayerwiseSampler(tree, [1, 2])
    with pytest.raises(ValueError, match="mode"):
        LayerwiseSampler(tree, explicit, mode="hs")
    with pytest.raises(KeyError):
        LayerwiseSampler(tree, explicit).sample(np.array([99]))


# ------------------------------------------------------- profiles and distinct draws (issue 14)
def full_binary(depth: int) -> list[int]:
    return [2**j for j in range(depth + 1)]


@pytest.mark.parametrize("profile", ["proportional", "leaf_heavy"])
def test_profiles_sum_to_the_total_respect_caps_and_grow_towards_the_leaves(profile):
    uneven = Tree.from_ordered_items(np.arange(3755), arity=2).level_sizes.tolist()
    for sizes in (full_binary(5), full_binary(12), full_binary(22), uneven, [1, 3, 9, 27, 50]):
        caps = np.array(sizes[1:]) - 1
        for total in (0, 3, 20, 100, 509, 600, 10**6):
            counts = np.array(negatives_for_levels(sizes, total, profile))
            assert counts.sum() == min(total, caps.sum())
            assert np.all((counts >= 0) & (counts <= caps))
            if total >= (caps > 0).sum():  # every level with room gets at least one
                assert np.all(counts[caps > 0] >= 1)
            open_counts = counts[counts < caps]  # capped levels aside
            assert np.all(np.diff(open_counts) >= 0), (sizes, total, counts)


def test_leaf_heavy_puts_the_documented_share_on_the_last_two_levels():
    from tdm.sampler import LEAF_WEIGHT, NEXT_WEIGHT

    # the public code's UserBehavior profile: 200 and 76 of 509 on a 22-level tree
    assert negatives_for_levels(full_binary(22), 509, "leaf_heavy")[-2:] == [76, 200]
    for depth, total in [(12, 100), (12, 600), (16, 300), (22, 600)]:
        counts = negatives_for_levels(full_binary(depth), total, "leaf_heavy")
        scale = (depth - 1) / 2 + LEAF_WEIGHT + NEXT_WEIGHT  # the weights' sum / (depth - 2)
        # the documented share, up to rounding and what capped upper levels pass on
        assert abs(counts[-1] - total * LEAF_WEIGHT / scale) <= 1 + 0.01 * total
        assert abs(counts[-2] - total * NEXT_WEIGHT / scale) <= 1 + 0.01 * total
        proportional = negatives_for_levels(full_binary(depth), total)
        assert counts[-1] > 2 * proportional[-1] and sum(counts) == sum(proportional)
    # depth 12, 100 negatives: half at the leaves instead of ~15
    assert negatives_for_levels(full_binary(12), 100, "leaf_heavy")[-2:] == [19, 50]
    with pytest.raises(ValueError, match="profile"):
        negatives_for_levels(full_binary(3), 10, "flat")


def test_from_config_reads_profile_and_replacement():
    tree = Tree.from_ordered_items(np.arange(500), arity=2)
    cfg = SamplerConfig(total_negatives=60, profile="leaf_heavy", replacement=False, seed=4)
    sampler = LayerwiseSampler.from_config(tree, cfg)
    assert sampler.negatives_per_level == negatives_for_levels(tree.level_sizes, 60, "leaf_heavy")
    assert not sampler.replacement and sampler.seed == 4
    assert LayerwiseSampler.from_config(tree, SamplerConfig()).replacement  # today's default


def distinct_checks(tree, sampler, targets):
    """No repeat within a level, never the positive, inside the level; returns (nodes, mask)."""
    nodes, labels, mask = sampler.sample(targets)
    path = tree.ancestors(tree.item_to_leaf(targets))
    for j, pos, neg in columns(sampler):
        lo, hi = tree.level_offsets[j], tree.level_offsets[j + 1]
        nj, mj = nodes[:, neg], mask[:, neg]
        live = (path[:, j] >= 0) & (hi - lo > 1)
        np.testing.assert_array_equal(mask[:, pos], live)
        assert np.all((nj[mj] >= lo) & (nj[mj] < hi))
        assert not np.any((nj == path[:, j : j + 1]) & mj)  # the positive is never a negative
        if sampler.mode == "random":  # as many as the level has, all of them when it is small
            assert np.all(mj.sum(1) == np.where(live, min(len(neg), hi - lo - 1), 0))
        marked = np.where(mj, nj, -1 - np.arange(len(neg)))  # masked slots never collide
        ordered = np.sort(marked, axis=1)
        assert not np.any(ordered[:, 1:] == ordered[:, :-1]), f"repeat at level {j}"
        assert np.all(labels[:, neg] == 0) and np.all(labels[:, pos] == 1)
    return nodes, mask


@pytest.mark.parametrize("profile", ["proportional", "leaf_heavy"])
def test_no_repeated_negative_within_a_level(profile):
    tree = Tree.from_ordered_items(np.random.default_rng(0).permutation(3000), arity=2)
    targets = np.random.default_rng(1).integers(0, 3000, size=1000)
    for total in (20, 100, 600, 3000):  # sparse levels, dense levels, whole levels
        counts = negatives_for_levels(tree.level_sizes, total, profile)
        sampler = LayerwiseSampler(tree, counts, seed=total, replacement=False)
        distinct_checks(tree, sampler, targets)


def test_no_repeat_on_uneven_trees_and_in_siblings_mode():
    tree = uneven_tree()
    for mode in ("random", "siblings"):
        sampler = LayerwiseSampler(tree, [3, 3, 3], mode=mode, seed=0, replacement=False)
        nodes, mask = distinct_checks(tree, sampler, np.array([0, 1, 2, 1]))
        assert mask[1:, 1:4].sum(1).tolist() == [1, 1, 1]  # level 1: the one other node, once
    tree = Tree.from_ordered_items(np.arange(216), arity=6)  # 5 siblings everywhere
    for n in (2, 5, 7):
        sampler = LayerwiseSampler(
            tree, [n] * tree.depth, mode="siblings", seed=n, replacement=False
        )
        _, mask = distinct_checks(tree, sampler, np.arange(216))
        for _, _, neg in columns(sampler):
            assert np.all(mask[:, neg].sum(1) == min(n, 5))


@pytest.mark.parametrize("n", [4, 25])  # the sparse (rejection) and the dense (keys) path
def test_distinct_negatives_are_uniform(n):
    tree = Tree.from_ordered_items(np.arange(64), arity=2)  # level 6: 64 leaves
    counts = [1, 1, 1, 1, 1, n]
    sampler = LayerwiseSampler(tree, counts, seed=7, replacement=False)
    targets = np.zeros(4000, dtype=np.int64)  # always the same positive
    nodes, _, mask = sampler.sample(targets)
    j, pos, neg = list(columns(sampler))[-1]
    lo = tree.level_offsets[j]
    counts = np.bincount(nodes[:, neg].ravel() - lo, minlength=64)
    positive = nodes[0, pos] - lo
    assert counts[positive] == 0 and mask[:, neg].all()
    others = np.delete(counts, positive)
    expected = len(targets) * n / 63
    chi2 = ((others - expected) ** 2 / expected).sum() / (1 - n / 63)  # binomial counts
    assert chi2 < 120  # 62 degrees of freedom; p(chi2 > 120) ~ 1e-5


def test_distinct_draws_are_deterministic_per_seed():
    tree = Tree.from_ordered_items(np.arange(1000), arity=2)
    counts = negatives_for_levels(tree.level_sizes, 200, "leaf_heavy")
    targets = np.random.default_rng(3).integers(0, 1000, size=500)
    a = assert_same_seed_same_samples(tree, counts, targets, replacement=False)
    other = LayerwiseSampler(tree, counts, seed=6, replacement=False)
    assert not np.array_equal(a.sample(targets)[0], other.sample(targets)[0])
