"""The tree-vs-truth report in MLflow: ``tree.truth.*`` metrics (``tasks.tracking.log_tree``)
and their columns in ``tdm compare-trees``, on a temporary MLflow store."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tasks.tracking import TREE_COLUMNS, compare_trees, log_params, log_tree, tracked_run
from tdm.stages import tree_report
from tdm.tree import Tree

pytestmark = pytest.mark.integration

TRUTH_COLUMNS = ["cat.purity", "cat.NMI", "dept.purity", "dept.NMI"]


def _stats(tree: Tree, shuffle: bool) -> dict:
    category = np.arange(tree.n_items) // 8  # 8 categories of 8 items, 2 per department
    if shuffle:
        category = np.random.default_rng(0).permutation(category)
    return tree_report(tree, category, {"category": category, "department": category // 2})


def test_truth_metrics_are_logged_and_compared(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trees = []
    with tracked_run(uri, "pipeline", tmp_path) as parent:
        for r, shuffle in enumerate((False, True)):
            tree = Tree.from_ordered_items(np.arange(64), 2)
            path = tmp_path / f"round_{r}.tree"
            tree.save(path)
            trees.append(_stats(tree, shuffle))
            with tracked_run(uri, f"round-{r}", tmp_path, parent=parent) as run:
                log_params(run, {"round": r})
                figures = log_tree(run, path, trees[-1], first_round=r == 0)
            logged = MlflowClient(tracking_uri=uri).get_run(run.run_id).data.metrics
            truth = sorted(k for k in logged if k.startswith("tree.truth."))
            assert truth == [
                f"tree.truth.{grouping}_{figure}"
                for grouping in ("category", "department")
                for figure in ("level", "nmi", "purity")
            ]
            assert {k: logged[k] for k in truth} == {k: figures[k] for k in truth}
            assert logged["tree.truth.category_level"] == 3  # 8 nodes for 8 categories
            assert logged["tree.truth.department_level"] == 2
    assert trees[0]["truth"]["category"]["nmi"] == 1.0
    table = compare_trees(uri).splitlines()
    head = table[0].split()
    assert [label for _, label, _ in TREE_COLUMNS if label in TRUTH_COLUMNS] == TRUTH_COLUMNS
    at = head.index("cat.purity")
    assert head[at : at + 4] == TRUTH_COLUMNS
    rows = [line.split() for line in table[2:]]
    assert [r[1] for r in rows] == ["0", "1"]
    assert rows[0][at : at + 4] == ["1.000"] * 4  # the tree of the true groups
    for row, stats in zip(rows, trees, strict=True):
        truth = stats["truth"]
        assert row[at : at + 4] == [
            f"{truth[g][f]:.3f}" for g in ("category", "department") for f in ("purity", "nmi")
        ]
    assert float(rows[1][at + 1]) < 0.8  # the shuffled categories: far from 1
