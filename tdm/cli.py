"""The ``tdm`` command: one thin sub-command per stage function in ``tdm.stages``.

Every command takes ``--params FILE`` and any number of ``--set section.key=value``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that spin while waiting slow everything down 5-20x when
# another process shares the cores (measured, docs/PERFORMANCE.md). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tdm.config import ConfigError, load_config
from tdm.errors import TdmError
from tdm.paths import Paths

log = logging.getLogger("tdm")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (YAML)")
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one params value (repeatable)",
    )
    common.add_argument("--root", default=".", help="folder the artefacts are written under")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(prog="tdm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_, description=help_)

    add("prepare", "load the raw data, apply the paper's protocol, write prepared/")
    p = add("init-tree", "build the category-based initial tree (Sec. 3.5)")
    p.add_argument("--out", help="tree file (default trees/round_0.tree)")
    p = add("train", "train the model on a tree (Eq. 4)")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--tree", help="tree file (default trees/round_<r>.tree)")
    p.add_argument(
        "--init-from",
        default="auto",
        help="model folder to warm-start from; 'auto' (default): models/round_<r-1> when r > 0 "
        "and rounds.warm_start; 'none': from scratch",
    )
    p.add_argument("--out", help="model folder (default models/round_<r>)")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start from epoch 1 even when a checkpoint of the same run exists",
    )
    p = add("export-embeddings", "write the trained item embeddings")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--model", help="model folder (default models/round_<r>)")
    p.add_argument("--out", help="embeddings file (default embeddings/round_<r>.npy)")
    p = add(
        "relearn-tree",
        "re-learn the tree after a round: balanced k-means over the item embeddings (Sec. 3.5) "
        "or, with tree.learner=jtm, JTM's tree learning from the model's likelihood",
    )
    p.add_argument("--round", type=int, default=0, help="round whose model re-learns the tree")
    p.add_argument(
        "--embeddings", help="kmeans: embeddings file (default embeddings/round_<r>.npy)"
    )
    p.add_argument("--model", help="jtm: model folder (default models/round_<r>)")
    p.add_argument("--out", help="tree file (default trees/round_<r+1>.tree)")
    p = add("evaluate", "evaluate a trained model with beam search (Algorithm 1, Eq. 5-7)")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--model", help="model folder (default models/round_<r>)")
    p.add_argument("--out", help="metrics file (default metrics/round_<r>.json)")
    p = add("recommend", "top-k items for a behaviour history")
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument(
        "--history",
        required=True,
        help="comma-separated item_id[:timestamp] list, or a CSV file with item_id,timestamp",
    )
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--keep-seen", action="store_true", help="allow items of the history")
    add("pipeline", "prepare, init tree, then train/evaluate/export/relearn for every round")
    p = add("benchmark", "the paper's tables: baselines and TDM variants over seeds (Sec. 5)")
    p.add_argument("--dataset", help="name in the report (default: data.source)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="data.seed values (which users are test)")
    p.add_argument("--baselines", default="popular,itemcf,bpr,fm,youtube")
    p.add_argument("--variants", default="attention_dnn,dnn,product_dnn,attention_dnn_hs")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the attention-DNN (Table 4)")
    p.add_argument("--tune-mode", default="none", choices=["none", "items", "categories"])
    p.add_argument("--out", help="report folder (default reports/<dataset>)")
    p.add_argument("--work", help="scratch folder for models (default: a temporary folder)")
    p = add("generate", "write the synthetic data set as a UserBehavior.csv file")
    p.add_argument("--out", required=True)
    p = add("serve", "the online retrieval service over HTTP: behaviour events in, top-k out")
    p.add_argument(
        "--model",
        help="model folder or models:/NAME/ALIAS|VERSION (MLflow registry; needs the mlops "
        "extra); default serve.model, else models/round_<rounds.count-1>",
    )
    p.add_argument("--host", help="address to listen on (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default serve.port)")
    p.add_argument("--store", help="behaviour store, a SQLite file (default serve.store)")
    p.add_argument("--titles", help="item titles: MovieLens folder or movies file, or a CSV")
    p.add_argument(
        "--import-users",
        metavar="PREPARED",
        help="put the known histories of a prepared folder's evaluation users into an empty store",
    )
    p.add_argument("--device", help="where to score (default CUDA when present)")
    for register in _plugins(COMMANDS).values():  # e.g. compare-trees, from tasks/
        register(sub, common)
    return parser


COMMANDS = "tdm.commands"  # entry points: register(subparsers, common) adds a sub-command
FIGURES = "tdm.figures"  # entry points: draw(data, path, title) -> path (matplotlib)
# The commands that write under --root: each holds the root's lock while it runs.
WRITERS = (
    "prepare",
    "init-tree",
    "train",
    "export-embeddings",
    "relearn-tree",
    "evaluate",
    "pipeline",
)


class CommandError(TdmError, RuntimeError):
    """A command that cannot do what was asked; the message is shown as one line."""


def _plugins(group: str) -> dict:
    """The loaded entry points of ``group``, by name (none when the package is not installed)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.load() for ep in entry_points(group=group)}


def _history(text: str):
    """``--history``: a CSV file with item_id[,timestamp] columns, or ``id[:ts],id[:ts],...``."""
    path = Path(text)
    if path.is_file():
        import pandas as pd

        frame = pd.read_csv(path)
        if "item_id" not in frame.columns:
            raise ConfigError(f"{path}: needs an item_id column (and optionally timestamp)")
        return frame
    out = []
    for part in text.split(","):
        item, _, stamp = part.strip().partition(":")
        try:
            out.append((int(item), int(stamp) if stamp else None))
        except ValueError:
            raise ConfigError(f"--history: {part!r} is not item_id[:timestamp]") from None
    return out


def _init_from(value: str, round_: int, warm_start: bool, paths: Paths) -> Path | None:
    if value == "auto":
        return paths.model(round_ - 1) if (round_ > 0 and warm_start) else None
    return None if value == "none" else Path(value)


def format_rounds(summary: dict, topk: int) -> str:
    """A plain-text table of Precision/Recall@M per round and filter mode, TDM vs most-popular."""
    modes = [k.split("/")[1] for k in summary["rounds"][0] if k.startswith("tdm/")][::2]
    head = f"{'round':>5}  {'method':<12}"
    head += "".join(f"  {m + ' P/R@' + str(topk):>20}" for m in modes)
    lines = [head, "-" * len(head)]
    for row in summary["rounds"]:
        for who, label in (("tdm", "TDM"), ("most_popular", "most-popular")):
            cells = "".join(
                f"  {100 * row[f'{who}/{m}/precision']:>8.2f}% /"
                f"{100 * row[f'{who}/{m}/recall']:>6.2f}%"
                for m in modes
            )
            lines.append(f"{row['round']:>5}  {label:<12}{cells}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    from tdm.runtime import tune_allocator

    tune_allocator()
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is not None:  # a command registered through the tdm.commands entry points
        return int(handler(args))
    cfg = _config(args)
    if args.command in WRITERS and _takes_lock():
        from tdm.io import root_lock

        with root_lock(args.root, "tdm " + " ".join(argv if argv is not None else sys.argv[1:])):
            return _dispatch(args, cfg)
    return _dispatch(args, cfg)


def _takes_lock() -> bool:
    """A process of a multi-process run locks the root once: the launcher (``train.nproc``) holds
    it for its ranks; under a user's own torchrun, local rank 0 takes it for its node."""
    if os.environ.get("TDM_LOCK_HELD") == "1":
        return False
    return "TORCHELASTIC_RUN_ID" not in os.environ or os.environ.get("LOCAL_RANK", "0") == "0"


def _config(args: argparse.Namespace):
    """The params of the command; ``recommend`` falls back to the defaults without a file."""
    if (
        args.command in ("recommend", "serve")
        and not Path(args.params).exists()
        and not args.overrides
    ):
        from tdm.config import Config

        return Config()
    return load_config(args.params, args.overrides)


def _dispatch(args: argparse.Namespace, cfg) -> int:
    from tdm import stages  # heavy imports (torch) only once the arguments are valid

    cmd = args.command
    paths = Paths(Path(args.root))
    r = getattr(args, "round", 0)
    if cmd == "prepare":
        result = stages.prepare(cfg, paths.prepared)
    elif cmd == "init-tree":
        result = stages.init_tree(cfg, paths.prepared, Path(args.out or paths.tree(0)))
    elif cmd == "train":
        result = stages.train(
            cfg,
            paths.prepared,
            Path(args.tree or paths.tree(r)),
            Path(args.out or paths.model(r)),
            init_from=_init_from(args.init_from, r, cfg.rounds.warm_start, paths),
            fresh=args.fresh,
        )
    elif cmd == "export-embeddings":
        result = stages.export_embeddings(
            Path(args.model or paths.model(r)), Path(args.out or paths.embeddings(r))
        )
    elif cmd == "relearn-tree":
        result = stages.relearn_tree(
            cfg,
            Path(args.embeddings or paths.embeddings(r)),
            Path(args.out or paths.tree(r + 1)),
            model_dir=Path(args.model or paths.model(r)),
            prepared_dir=paths.prepared,
        )
    elif cmd == "evaluate":
        result = stages.evaluate(
            cfg,
            paths.prepared,
            Path(args.model or paths.model(r)),
            Path(args.out or paths.metrics(r)),
        )
    elif cmd == "recommend":
        from tdm.recommender import Recommender

        rec = Recommender.load(
            args.model,
            model_name=cfg.model.name,
            max_k=cfg.retrieval.max_k,
            filter_beam=cfg.retrieval.filter_beam,
        )
        items, scores = rec.recommend(
            _history(args.history), args.k, exclude_seen=not args.keep_seen
        )
        result = {"items": items.tolist(), "scores": [round(float(s), 6) for s in scores]}
    elif cmd == "pipeline":
        summary = stages.pipeline(cfg, paths)
        print(format_rounds(summary, cfg.eval.topk))
        print(f"metrics: {paths.root / 'metrics'}/round_<r>.json; total {summary['seconds']} s")
        return 0
    elif cmd == "generate":
        result = stages.generate(cfg, Path(args.out))
    elif cmd == "benchmark":
        _benchmark(cfg, args)
        return 0
    elif cmd == "serve":
        from tdm.serving.app import serve
        from tdm.serving.source import scheme

        def here(path: str | None) -> str | None:  # paths given here: relative to the cwd
            return str(Path(path).resolve()) if path else None

        # params' paths (serve.model, serve.store, the default model) are relative to --root
        source = cfg.serve.model or Paths(Path(".")).model(cfg.rounds.count - 1).as_posix()
        if args.model:
            source = args.model if scheme(args.model) else here(args.model)
        serve(
            cfg,
            source,
            root=args.root,
            host=args.host,
            port=args.port,
            store=here(args.store),
            titles=here(args.titles),
            import_users=here(args.import_users),
            device=args.device,
        )
        return 0
    else:  # pragma: no cover - argparse rejects unknown commands
        raise AssertionError(cmd)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    return 0


def _benchmark(cfg, args: argparse.Namespace) -> None:
    """``tdm benchmark``: results.json, tables.md and (with matplotlib) fig4.png, fig5.png."""
    import tempfile

    from tdm import benchmark

    dataset = args.dataset or cfg.data.source
    out = Path(args.out or Path(args.root) / "reports" / dataset)
    with tempfile.TemporaryDirectory(prefix="tdm-benchmark-") as tmp:
        result = benchmark.run(
            cfg,
            dataset,
            Path(args.work or tmp),
            [int(s) for s in args.seeds.split(",")],
            [b for b in args.baselines.split(",") if b],
            [v for v in args.variants.split(",") if v],
            rounds=args.rounds,
            tune_mode=args.tune_mode,
        )
    tables = benchmark.write_report(result, out)
    figures = (
        ("fig4", "layerwise_recall", f"{dataset}: TDM product-DNN, category tree"),
        ("fig5", "test_curves", f"{dataset}: TDM attention-DNN, category vs learnt tree"),
    )
    for name, drawer, title in figures:
        data = result["summary"].get(name)
        if not data:
            continue
        draw = _plugins(FIGURES).get(drawer)
        if draw is None:  # matplotlib comes with the mlops extra; the tables do not need it
            log.warning("no figure drawer installed (pip install tdm-flow[mlops]): no %s.png", name)
        else:
            draw(data, out / f"{name}.png", title)
    print(tables)
    print(f"wrote {out}/results.json, tables.md")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every expected error becomes one line and exit status 2."""
    try:
        sys.exit(run(argv))
    except _expected_errors() as exc:
        print(f"tdm: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's or the environment's fault, never a bug (``tdm.errors``),
    and files that cannot be read or written."""
    return (TdmError, OSError)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    main()
