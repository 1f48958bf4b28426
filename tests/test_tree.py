"""Behaviour of the array-backed tree index (tdm/tree.py) on small hand-checked trees."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tdm.tree import Tree, TreeFormatError

# Tree.from_ordered_items([10, 11, 12, 13, 14], arity=2), drawn by hand (node: items below):
#   level 0: 0 {10..14}
#   level 1: 1 {10, 11, 12}        2 {13, 14}
#   level 2: 3 {10, 11}   4 (12)   5 (13)   6 (14)
#   level 3: 7 (10)   8 (11)
FIVE_PARENT = [-1, 0, 0, 1, 1, 2, 2, 3, 3]
FIVE_ITEM = [-1, -1, -1, -1, 12, 13, 14, 10, 11]

# Tree.from_ordered_items([0..6], arity=3): 7 = 3 + 2 + 2
#   level 1: 1 {0, 1, 2}   2 {3, 4}   3 {5, 6}
#   level 2: 4 (0) 5 (1) 6 (2) | 7 (3) 8 (4) | 9 (5) 10 (6)
SEVEN_PARENT = [-1, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
SEVEN_ITEM = [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5, 6]


@pytest.fixture
def five() -> Tree:
    return Tree.from_ordered_items(np.array([10, 11, 12, 13, 14]), arity=2)


@pytest.fixture
def seven() -> Tree:
    return Tree.from_ordered_items(np.arange(7), arity=3)


# ------------------------------------------------------------------------------------ building
def test_from_ordered_items_matches_hand_drawn_binary_tree(five: Tree) -> None:
    assert five.parent.tolist() == FIVE_PARENT
    assert five.node_item.tolist() == FIVE_ITEM
    assert five == Tree(np.array(FIVE_PARENT), np.array(FIVE_ITEM))


def test_from_ordered_items_matches_hand_drawn_ternary_tree(seven: Tree) -> None:
    assert seven.parent.tolist() == SEVEN_PARENT
    assert seven.node_item.tolist() == SEVEN_ITEM


def test_single_item_tree_is_a_lone_root() -> None:
    tree = Tree.from_ordered_items(np.array([42]), arity=2)
    assert tree.n_nodes == 1 and tree.n_items == 1 and tree.depth == 0
    assert tree.is_leaf.tolist() == [True]
    assert tree.item_to_leaf(np.array([42])).tolist() == [0]
    assert tree.ancestors(np.array([0])).tolist() == [[0]]
    assert tree.level_sizes.tolist() == [1]


@pytest.mark.parametrize("bad", [[], [1, 1]])
def test_from_ordered_items_rejects_empty_and_duplicate_items(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        Tree.from_ordered_items(np.array(bad, dtype=np.int64), arity=2)


def test_from_ordered_items_rejects_arity_below_two() -> None:
    with pytest.raises(ValueError, match="arity"):
        Tree.from_ordered_items(np.arange(4), arity=1)


# ------------------------------------------------------------------------------------ structure
def test_structure_of_binary_tree_with_uneven_leaf_depths(five: Tree) -> None:
    assert five.n_nodes == 9 and five.n_items == 5 and five.depth == 3
    assert five.level_sizes.tolist() == [1, 2, 4, 2]
    assert five.level_offsets.tolist() == [0, 1, 3, 7, 9]
    assert five.level.tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert five.is_leaf.tolist() == [False] * 4 + [True] * 5
    assert five.leaf_items.tolist() == [12, 13, 14, 10, 11]
    assert five.max_arity == 2
    stats = five.stats()
    assert (stats["min_leaf_depth"], stats["max_leaf_depth"]) == (2, 3)
    assert stats["mean_fanout"] == 2.0


def test_item_to_leaf(five: Tree) -> None:
    assert five.item_to_leaf(np.array([12, 10, 14, 11, 13])).tolist() == [4, 7, 6, 8, 5]
    assert five.item_to_leaf(np.array([[10], [13]])).tolist() == [[7], [5]]  # any shape


@pytest.mark.parametrize("unknown", [0, 9, 15, 99, -1])
def test_item_to_leaf_names_unknown_item(five: Tree, unknown: int) -> None:
    with pytest.raises(KeyError, match=str(unknown)):
        five.item_to_leaf(np.array([10, unknown]))


def test_ancestors_column_is_level_and_shallow_leaves_are_padded(five: Tree) -> None:
    got = five.ancestors(np.array([7, 8, 4, 5, 6, 3, 0]))
    assert got.tolist() == [
        [0, 1, 3, 7],
        [0, 1, 3, 8],
        [0, 1, 4, -1],
        [0, 2, 5, -1],
        [0, 2, 6, -1],
        [0, 1, 3, -1],  # an inner node: itself at its own level
        [0, -1, -1, -1],
    ]


def test_children_of_pads_to_max_arity(five: Tree, seven: Tree) -> None:
    assert five.children_of(np.array([0, 1, 3, 4])).tolist() == [
        [1, 2],
        [3, 4],
        [7, 8],
        [-1, -1],
    ]
    assert seven.max_arity == 3
    assert seven.children_of(np.array([0, 1, 2, 3, 10])).tolist() == [
        [1, 2, 3],
        [4, 5, 6],
        [7, 8, -1],
        [9, 10, -1],
        [-1, -1, -1],
    ]


def test_ternary_tree_ancestors_and_leaves(seven: Tree) -> None:
    leaves = seven.item_to_leaf(np.arange(7))
    assert leaves.tolist() == [4, 5, 6, 7, 8, 9, 10]
    assert seven.ancestors(leaves)[:, 1].tolist() == [1, 1, 1, 2, 2, 3, 3]
    assert seven.level_sizes.tolist() == [1, 3, 7]


def test_embedding_rows_leaves_use_item_index_inner_nodes_follow() -> None:
    tree = Tree.from_ordered_items(np.array([3, 1, 4, 0, 2]), arity=2)  # items 0..4
    rows = tree.embedding_rows()
    # leaves 4..8 hold items [4, 0, 2, 3, 1] (order: hand-drawn five-item shape above)
    assert tree.node_item.tolist() == [-1, -1, -1, -1, 4, 0, 2, 3, 1]
    assert rows.tolist() == [5, 6, 7, 8, 4, 0, 2, 3, 1]
    assert sorted(rows.tolist()) == list(range(tree.n_nodes))


def test_embedding_rows_rejects_item_ids_that_are_not_indices(five: Tree) -> None:
    with pytest.raises(ValueError, match="0..n_items-1"):
        five.embedding_rows()


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("parent", "node_item", "match"),
    [
        ([], [], "non-empty"),
        ([-1, 0], [-1], "equal length"),
        ([0, 0, 0], [-1, 1, 2], "root"),
        ([-1, 0, 2], [-1, 1, 2], "breadth-first"),  # parent not smaller than the node
        ([-1, 1, 0], [-1, 1, 2], "breadth-first"),  # node's own id as parent
        ([-1, 0, 0, 2, 1], [-1, -1, -1, 3, 4], "breadth-first"),  # parents not sorted
        ([-1, 0, -1], [-1, 1, 2], "breadth-first"),  # a second root
        ([-1, 0, 0], [-1, 1, -1], "leaves"),  # a leaf without item
        ([-1, 0, 0, 1], [5, -1, 2, 3], "leaves"),  # an inner node with an item
        ([-1, 0, 0], [-1, 7, 7], "more than one leaf"),
    ],
)
def test_invalid_trees_are_rejected(parent: list, node_item: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Tree(np.array(parent, dtype=np.int64), np.array(node_item, dtype=np.int64))


# ------------------------------------------------------------------------------------ persistence
def test_save_load_round_trip_is_byte_identical(tmp_path: Path, five: Tree) -> None:
    first, second = tmp_path / "a.tree", tmp_path / "sub" / "b.tree"
    five.save(first)
    loaded = Tree.load(first)
    assert loaded == five
    assert loaded.item_to_leaf(np.array([11])).tolist() == [8]
    loaded.save(second)
    assert first.read_bytes() == second.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_save_overwrites_atomically(tmp_path: Path, five: Tree, seven: Tree) -> None:
    path = tmp_path / "t.tree"
    five.save(path)
    seven.save(path)
    assert Tree.load(path) == seven


def _corrupt(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_missing_file_raises_tree_format_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.tree"
    with pytest.raises(TreeFormatError, match="nope.tree"):
        Tree.load(path)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b"", "bad magic"),
        (lambda b: b[:5], "bad magic"),
        (lambda b: b"NOTATREE" + b[8:], "bad magic"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[: len(b) // 2], "truncated|corrupt header"),
        (lambda b: b + b"\x00" * 8, "truncated"),
        (lambda b: b[:8] + struct.pack("<I", 99) + b[12:], "version 99"),
        (lambda b: b[:12] + struct.pack("<I", 3) + b[16:], "corrupt header"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
    ],
)
def test_damaged_file_raises_tree_format_error_naming_file(
    tmp_path: Path, five: Tree, damage, match: str
) -> None:
    good = tmp_path / "good.tree"
    five.save(good)
    bad = _corrupt(tmp_path / "damaged.tree", damage(good.read_bytes()))
    with pytest.raises(TreeFormatError, match=match) as info:
        Tree.load(bad)
    assert "damaged.tree" in str(info.value)


def test_every_single_bit_flip_is_detected(tmp_path: Path) -> None:
    tree = Tree.from_ordered_items(np.arange(3), arity=2)
    good = tmp_path / "good.tree"
    tree.save(good)
    blob = good.read_bytes()
    bad = tmp_path / "flipped.tree"
    for pos in range(len(blob)):
        for bit in range(8):
            flipped = bytearray(blob)
            flipped[pos] ^= 1 << bit
            bad.write_bytes(bytes(flipped))
            with pytest.raises(TreeFormatError, match="flipped.tree"):
                Tree.load(bad)


def test_well_formed_file_with_invalid_tree_raises_tree_format_error(tmp_path: Path) -> None:
    parent = np.array([-1, 0, 0], dtype="<i8")
    node_item = np.array([-1, 4, 4], dtype="<i8")  # the same item at two leaves
    payload = parent.tobytes() + node_item.tobytes()
    header = json.dumps(
        {"n_nodes": 3, "sha256": hashlib.sha256(payload).hexdigest()}, sort_keys=True
    ).encode()
    good = tmp_path / "t.tree"
    Tree.from_ordered_items(np.arange(2)).save(good)
    prefix = good.read_bytes()[:8]  # the magic
    bad = _corrupt(
        tmp_path / "invalid.tree", prefix + struct.pack("<II", 1, len(header)) + header + payload
    )
    with pytest.raises(TreeFormatError, match="invalid.tree.*invalid tree"):
        Tree.load(bad)
