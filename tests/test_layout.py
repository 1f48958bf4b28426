"""The rooms of STYLE.md: the algorithm package never reaches the orchestration tools."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("prefect", "mlflow", "dvc", "great_expectations", "tasks", "flows")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_tdm_never_imports_orchestration_code_not_even_lazily():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / "tdm").rglob("*.py"))
        for line, name in _imports(path)
        if name.split(".")[0] in FORBIDDEN
    ]
    assert offenders == []


def test_the_orchestration_commands_and_figures_are_entry_points():
    """`tdm compare-trees`, fig4 and fig5 reach tasks/ through the package's entry points."""
    from importlib.metadata import entry_points

    commands = {ep.name: ep.value for ep in entry_points(group="tdm.commands")}
    figures = {ep.name: ep.value for ep in entry_points(group="tdm.figures")}
    assert commands == {"compare-trees": "tasks.commands:compare_trees"}
    assert figures == {
        "layerwise_recall": "tasks.figures:layerwise_recall",
        "test_curves": "tasks.figures:test_curves",
    }
    from tdm.cli import _parser

    assert "compare-trees" in _parser()._subparsers._group_actions[0].choices


def test_dvc_train_stages_list_exactly_the_params_training_reads():
    """What invalidates a DVC train stage is what invalidates a checkpoint
    (``tdm.stages.TRAIN_PARAMS``): the two lists cannot drift apart."""
    import yaml

    from tdm.stages import TRAIN_PARAMS

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages["train"]["do"]["params"]) == set(TRAIN_PARAMS)
    assert set(stages["train_0"]["params"]) == set(TRAIN_PARAMS) - {"rounds.warm_start"}
