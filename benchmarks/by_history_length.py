"""Where TDM wins and loses against most-popular: metrics @M per group of test users, grouped
by the length of their known history (the first half of their timeline, Sec. 5.1).

Reads what a ``tdm benchmark --work DIR`` run leaves behind (``DIR/seed_<s>/<variant>/`` with
``prepared/`` and ``models/round_<r>/``), evaluates the round's model on each seed's test users
exactly as ``tdm evaluate`` does (beam search, filter modes none and items), and most-popular next
to it, then pools the users of all seeds and prints Precision/Recall@M per group. Writes
``benchmarks/results/by_history_length.json``.

    python benchmarks/by_history_length.py --work /tmp/bench/ml-nb --round 0 \\
        --set retrieval.beam_size=30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tdm.baselines.popular import MostPopular  # noqa: E402
from tdm.config import EvalConfig, load_config  # noqa: E402
from tdm.data.protocol import load_prepared  # noqa: E402
from tdm.evaluation import evaluate_split  # noqa: E402
from tdm.recommender import Recommender  # noqa: E402

MODES = ["none", "items"]


def per_user(folder: Path, round_: int, cfg) -> dict:
    """Per-user history length and P/R@M of TDM and most-popular on one seed's test users."""
    data = load_prepared(folder / "prepared")
    rec = Recommender.load(folder / "models" / f"round_{round_}")
    split = data.test
    eval_cfg = EvalConfig(topk=cfg.eval.topk, filters=MODES)
    popular = MostPopular(data.items["train_count"].to_numpy())
    out = {"history": np.diff(split.hist_offsets)}
    for who, ranker in (("tdm", rec.ranker(cfg.retrieval)), ("popular", popular.ranker())):
        out[who] = evaluate_split(ranker, data, split, eval_cfg, per_user=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a `tdm benchmark --work` folder")
    ap.add_argument("--variant", default="attention_dnn")
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--bounds", default="10,25,69", help="history lengths that start a group")
    ap.add_argument("--set", action="append", default=[], help="params override (retrieval)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/by_history_length.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "params.yaml", args.set)
    folders = sorted(args.work.glob(f"seed_*/{args.variant}"))
    if not folders:
        raise SystemExit(f"{args.work}: no seed_*/{args.variant} folders")
    runs = [per_user(f, args.round, cfg) for f in folders]
    history = np.concatenate([r["history"] for r in runs])
    edges = [0, *(int(b) for b in args.bounds.split(",")), int(history.max()) + 1]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        group = (history >= lo) & (history < hi)
        row = {"history": f"[{lo}, {hi})", "users": int(group.sum())}
        for mode in MODES:
            for who in ("tdm", "popular"):
                recall = np.concatenate([r[who][mode]["recall_per_user"] for r in runs])
                precision = np.concatenate([r[who][mode]["precision_per_user"] for r in runs])
                rated = group & ~np.isnan(recall)  # users left with a truth, as in the means
                row[f"{who} P ({mode})"] = 100 * float(precision[rated].mean())
                row[f"{who} R ({mode})"] = 100 * float(recall[rated].mean())
        rows.append(row)
    keys = list(rows[0])
    print(f"{args.work} {args.variant} round {args.round}, {len(folders)} seeds, test users, %")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "work": str(args.work),
                "variant": args.variant,
                "round": args.round,
                "seeds": [f.parent.name for f in folders],
                "groups": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
