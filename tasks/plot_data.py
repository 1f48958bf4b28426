"""Plot data for ``dvc plots show``: CSV series derived from what the stages already write.

- ``plots/loss/round_<r>.csv``: ``epoch, loss, valid_recall``, from
  ``models/round_<r>/train_log.json`` (one row per epoch run);
- ``plots/layerwise/round_<r>.csv``: ``level, level_size, beam, brute_force``, from
  ``metrics/round_<r>.json`` (layer-wise Recall@k of beam search vs brute force, Fig. 4);
- ``plots/rounds.csv``: ``round`` and ``<method>_<filter>_<precision|recall>`` for TDM and
  most-popular, from ``metrics/round_<r>.json`` of every round.

The DVC stages ``plot_data@<r>`` and ``plot_summary`` run this module; the Prefect flow calls the
same functions, so both doors write the same files. No torch or MLflow import: a DVC stage
starts in well under a second.

    python -m tasks.plot_data --round 0     # after `tdm evaluate --round 0`
    python -m tasks.plot_data --summary     # after the last round (reads rounds.count)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from tdm.io import write_text

PLOTS = "plots"
METHODS = (("tdm", "tdm"), ("most_popular", "popular"))


def loss_path(root: str | Path, round_: int) -> Path:
    return Path(root) / PLOTS / "loss" / f"round_{round_}.csv"


def layerwise_path(root: str | Path, round_: int) -> Path:
    return Path(root) / PLOTS / "layerwise" / f"round_{round_}.csv"


def rounds_path(root: str | Path) -> Path:
    return Path(root) / PLOTS / "rounds.csv"


def _metrics_file(root: str | Path, round_: int) -> Path:
    from tdm.paths import Paths

    return Paths(Path(root)).metrics(round_)


def _train_log_file(root: str | Path, round_: int) -> Path:
    from tdm.paths import Paths
    from tdm.stages import TRAIN_LOG_FILE

    return Paths(Path(root)).model(round_) / TRAIN_LOG_FILE


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """Write rows as CSV atomically (temp file + rename, like every stage output)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (run the round's train and evaluate first)")
    return json.loads(path.read_text())


def _num(value) -> float | str:
    """A CSV cell: the number, or empty for a missing / NaN value."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return value


def write_round(root: str | Path, round_: int) -> list[Path]:
    """Round ``round_``'s loss curve and layer-wise recall as CSV. Returns the files written."""
    train_log = _read_json(_train_log_file(root, round_))
    losses = train_log.get("losses", [])
    recalls = train_log.get("valid_recall", [])
    rows = [
        [epoch + 1, _num(loss), _num(recalls[epoch] if epoch < len(recalls) else None)]
        for epoch, loss in enumerate(losses)
    ]
    written = [_write_csv(loss_path(root, round_), ["epoch", "loss", "valid_recall"], rows)]

    layerwise = _read_json(_metrics_file(root, round_)).get("layerwise_recall") or {}
    levels = layerwise.get("level", [])
    rows = [
        [level, size, _num(beam), _num(brute)]
        for level, size, beam, brute in zip(
            levels,
            layerwise.get("level_size", [""] * len(levels)),
            layerwise.get("beam", []),
            layerwise.get("brute_force", []),
            strict=False,
        )
    ]
    header = ["level", "level_size", "beam", "brute_force"]
    written.append(_write_csv(layerwise_path(root, round_), header, rows))
    return written


def write_summary(root: str | Path, rounds: int) -> Path:
    """``plots/rounds.csv``: Precision/Recall@M of TDM and most-popular per filter mode, one row
    per round ``0..rounds-1``."""
    reports = [_read_json(_metrics_file(root, r)) for r in range(rounds)]
    modes = list(reports[0]["tdm"]) if reports else []
    header = ["round"]
    for _, label in METHODS:
        for mode in modes:
            header += [f"{label}_{mode}_precision", f"{label}_{mode}_recall"]
    rows = []
    for r, report in enumerate(reports):
        row: list = [r]
        for who, _ in METHODS:
            for mode in modes:
                values = report.get(who, {}).get(mode, {})
                row += [_num(values.get("precision")), _num(values.get("recall"))]
        rows.append(row)
    return _write_csv(rounds_path(root), header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the CSV series `dvc plots` draws.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--round", type=int, help="loss and layer-wise recall of one round")
    which.add_argument("--summary", action="store_true", help="recall per round (rounds.count)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    if args.summary:
        from tdm.config import load_config

        written = [write_summary(args.root, load_config(args.params, args.overrides).rounds.count)]
    else:
        written = write_round(args.root, args.round)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
