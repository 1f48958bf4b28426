"""Beam search (Algorithm 1) against brute-force scoring of every leaf, same model, same run.

For each (leaves, model, k): a near-complete binary tree over ``leaves`` items and a scorer with
random weights (``tdm.model``; history length 69, 10 time windows, every history full), users
with random histories. Measured:

- throughput: ``beam_search`` over batches of ``--batch`` users; users/s and the latency of a
  whole batch (p50/p99 over the batches);
- online latency: one user per call (batch of 1), p50/p99 over the users;
- nodes scored per user (``SearchStats``), asserted <= sum over levels of min(level size, 2k)
  <= 2*k*depth;
- the scoring step: FLOPs per scored node counted by ``torch.utils.flop_counter`` on
  ``model.score``; time inside ``model.score`` during a batch; achieved GFLOP/s, next to a plain
  fp32 ``torch.matmul`` measured just before (2048^3 and the head's first-layer shape), both best
  of a few;
- the user-side work is done once per user: ``user_state`` sees every user exactly once, and the
  FLOPs of ``score`` double exactly when the nodes per user double (no per-user term inside it);
- brute force (``tdm.retrieval.brute_force``, top 10 of all leaves) with the nodes per score
  call that are fastest for the model (tried on one user), timed on a few users and expressed
  per user (labelled "extrapolated": it is far too slow for every user); the speedup is
  brute-force time per user / beam-search time per user in batch mode.

    python benchmarks/beam_search.py                    # 10k, 100k, 1M leaves; k 10, 200
    python benchmarks/beam_search.py --full             # adds 4M leaves, longer runs
    python benchmarks/beam_search.py --leaves 10000 --models dnn --ks 10 --budget 1
    python benchmarks/beam_search.py --device cuda

Prints a table and writes benchmarks/results/beam_search_<hostname>[_cuda][_full].json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Before torch loads libgomp: spinning OpenMP threads collapse on shared cores (PERFORMANCE.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    best_time,
    machine_info,
    matmul_gflops,
    percentile,
    print_ops,
    result_name,
    sync,
    top_ops,
    write_result,
)
from tdm.config import ModelConfig  # noqa: E402
from tdm.model import build_model, select_state  # noqa: E402
from tdm.retrieval import beam_search, brute_force  # noqa: E402
from tdm.tree import Tree  # noqa: E402

MODELS = ("dnn", "attention_dnn")
HISTORY = 69  # params.yaml data.max_history
WINDOWS = 10  # params.yaml data.time_windows
BRUTE_K = 10
BRUTE_CHUNKS = (256, 1024, 4096, 16384, 65536)  # nodes per brute-force score call, tried
BRUTE_CHUNKS_GPU = (262144, 1048576)  # and on a GPU


def make_users(n_users: int, n_items: int, rng: np.random.Generator):
    """(U, L) random item histories (all full) and their windows, oldest first (largest window)."""
    hist = rng.integers(0, n_items, (n_users, HISTORY), dtype=np.int64)
    windows = np.sort(rng.integers(0, WINDOWS, (n_users, HISTORY), dtype=np.int64), axis=1)
    return hist, np.ascontiguousarray(windows[:, ::-1])


class Probe:
    """Counts the users given to ``user_state`` and times ``score`` on one model instance."""

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        self.model, self.device = model, device
        self.state_rows = 0
        self.score_seconds = 0.0
        self.score_pairs = 0
        self._state, self._score = model.user_state, model.score

    def __enter__(self) -> Probe:
        def user_state(hist, windows):
            self.state_rows += hist.shape[0]
            return self._state(hist, windows)

        def score(state, rows):
            sync(self.device)
            start = time.perf_counter()
            out = self._score(state, rows)
            sync(self.device)
            self.score_seconds += time.perf_counter() - start
            self.score_pairs += rows.numel()
            return out

        self.model.user_state, self.model.score = user_state, score  # instance attributes
        return self

    def __exit__(self, *exc) -> None:
        del self.model.user_state, self.model.score


class _Work(TorchDispatchMode):
    """Counts the elements written by every non-view aten op (elementwise work included)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.elements += t.numel()
        return out


def work_split(model, n_items: int, device: str) -> dict:
    """FLOPs and elements written by ``score`` split into per-(user, node), per-user, per-call.

    ``score`` runs on (B, N) = (2, 8), (2, 16), (4, 8), (4, 16); a per-user term is work in
    ``score`` that does not depend on the node (it belongs in ``user_state``). FLOPs are counted
    by ``torch.utils.flop_counter`` (matmuls), elements by every non-view op's outputs. One
    call runs first, uncounted: what a model keeps between calls (the folded BatchNorms) is
    not per-call work.
    """
    rng = np.random.default_rng(1)
    hist, windows = (torch.as_tensor(a, device=device) for a in make_users(4, n_items, rng))
    rows = torch.randint(0, n_items, (4, 16), device=device)

    def count(fn) -> tuple[int, int]:
        flops, work = FlopCounterMode(display=False), _Work()
        with flops, work:
            fn()
        return flops.get_total_flops(), work.elements

    with torch.inference_mode():
        state = model.user_state(hist, windows)
        model.score(select_state(state, slice(0, 2)), rows[:2, :8])  # work kept between calls
        user_flops = count(lambda: model.user_state(hist, windows))[0] / 4
        f = {
            (b, n): count(
                lambda b=b, n=n: model.score(select_state(state, slice(0, b)), rows[:b, :n])
            )
            for b in (2, 4)
            for n in (8, 16)
        }
    out = {"user_state_flop_per_user": user_flops}
    for i, what in enumerate(("flop", "elements")):
        pair = (f[2, 16][i] - f[2, 8][i]) / 16
        user = (f[4, 8][i] - f[2, 16][i]) / 2
        call = f[2, 8][i] - 16 * pair - 2 * user
        assert abs(64 * pair + 4 * user + call - f[4, 16][i]) <= 1e-6 * f[4, 16][i], what
        out[f"score_{what}_per_node"] = pair
        out[f"score_{what}_per_user_per_call"] = user
        out[f"score_{what}_per_call"] = call
    return out


def level_bound(tree: Tree, k: int) -> int:
    """Most nodes Algorithm 1 can score per user: sum over levels 1..depth of min(size, a*k)."""
    sizes = tree.level_sizes[1:]
    return int(np.minimum(sizes, tree.max_arity * k).sum())


def run_batches(model, tree, hist, windows, k, batch, budget, min_batches, max_batches):
    """Distinct batches of users until the time budget; per-batch seconds and stats."""
    seconds, users, nodes, max_nodes = [], 0, 0, 0
    n_users = len(hist)
    for b in range(max_batches):
        s = (b * batch) % max(n_users - batch + 1, 1)
        start = time.perf_counter()
        *_, stats = beam_search(
            model, tree, hist[s : s + batch], windows[s : s + batch], k, batch_size=batch,
            with_stats=True,
        )  # fmt: skip
        seconds.append(time.perf_counter() - start)
        users += batch
        nodes += stats.nodes_scored
        max_nodes = max(max_nodes, stats.max_nodes_scored)
        if b + 1 >= min_batches and sum(seconds) >= budget:
            break
    return seconds, users, nodes, max_nodes


def run_config(model, tree, hist, windows, k, args, flops) -> dict:
    """Batch throughput, scoring GFLOP/s, online latency of one (leaves, model, k)."""
    dev = args.device
    batch = args.batch
    beam_search(model, tree, hist[:batch], windows[:batch], k, batch_size=batch)  # warm-up
    seconds, users, nodes, max_nodes = run_batches(
        model, tree, hist, windows, k, batch, args.budget, 2, args.max_batches
    )
    bound = level_bound(tree, k)
    assert max_nodes <= bound <= 2 * k * tree.depth, (max_nodes, bound)

    # Scoring step: time inside model.score on one batch (of at most ~budget/2 seconds, >= 32
    # users), best of 3, right after a plain matmul.
    per_user = sum(seconds) / users
    probe_users = min(batch, max(32, int(args.budget / 2 / per_user)))
    head_rows = 8192
    mm = matmul_gflops(dev, ((head_rows, WINDOWS * 24 + 24, 128),))
    best = None
    for _ in range(3):
        with Probe(model, dev) as probe:
            start = time.perf_counter()
            *_, stats = beam_search(
                model,
                tree,
                hist[:probe_users],
                windows[:probe_users],
                k,
                batch_size=probe_users,
                with_stats=True,
            )
            total = time.perf_counter() - start
        assert probe.state_rows == probe_users, "user_state must see every user exactly once"
        gflops = probe.score_pairs * flops["score_flop_per_node"] / probe.score_seconds / 1e9
        if best is None or gflops > best["score_gflops"]:
            best = {
                "score_gflops": gflops,
                "score_share_of_time": probe.score_seconds / total,
                "probe_users": probe_users,
                "user_state_calls": stats.user_state_calls,
                "user_state_rows": probe.state_rows,
            }

    # Online: one user per call.
    single = []
    start_all = time.perf_counter()
    for u in range(args.max_single):
        start = time.perf_counter()
        beam_search(model, tree, hist[u : u + 1], windows[u : u + 1], k, batch_size=1)
        single.append(time.perf_counter() - start)
        if u + 1 >= args.min_single and time.perf_counter() - start_all >= args.budget:
            break
    sync(dev)
    with Probe(model, dev) as probe:  # where a single user's time goes, on a few users
        start = time.perf_counter()
        for u in range(min(10, len(single))):
            beam_search(model, tree, hist[u : u + 1], windows[u : u + 1], k, batch_size=1)
        single_share = probe.score_seconds / (time.perf_counter() - start)
    total = sum(seconds)
    return {
        "k": k,
        "batch_users": batch,
        "batches": len(seconds),
        "users_per_s": users / total,
        "ms_per_user_batched": 1e3 * total / users,
        "batch_ms_p50": 1e3 * percentile(seconds, 50),
        "batch_ms_p99": 1e3 * percentile(seconds, 99),
        "single_users": len(single),
        "single_ms_p50": 1e3 * percentile(single, 50),
        "single_ms_p99": 1e3 * percentile(single, 99),
        "single_score_share_of_time": single_share,
        "nodes_per_user": nodes / users,
        "max_nodes_per_user": max_nodes,
        "nodes_bound": bound,
        "bound_2k_depth": 2 * k * tree.depth,
        **best,
        "matmul_gflops": mm,
        "score_pct_of_matmul_2048": 100 * best["score_gflops"] / mm["2048x2048x2048"],
        "score_pct_of_matmul_head": 100 * best["score_gflops"] / mm[f"{head_rows}x264x128"],
    }


def brute_chunk(model, n_items: int, hist, windows, device: str) -> int:
    """The fastest nodes-per-call of ``model.score`` for one user (best of 3 each), so that brute
    force is timed at its best: a chunk too large for the cache is several times slower."""
    state = model.user_state(
        torch.as_tensor(hist[:1], device=device), torch.as_tensor(windows[:1], device=device)
    )
    chunks = BRUTE_CHUNKS + (BRUTE_CHUNKS_GPU if device.startswith("cuda") else ())
    rows = torch.randint(0, n_items, (1, max(chunks)), device=device)
    per_node = {}
    with torch.inference_mode():
        for chunk in chunks:
            if chunk > max(n_items, chunks[0]):
                continue
            seconds = best_time(lambda c=chunk: model.score(state, rows[:, :c]), 3, device)
            per_node[chunk] = seconds / chunk
    return min(per_node, key=per_node.get)


def run_brute(model, tree, hist, windows, args, flops) -> dict:
    """Brute-force top 10 over every leaf, timed on the first users until the budget."""
    chunk = brute_chunk(model, tree.n_items, hist, windows, args.device)
    per_call_users = max(1, chunk // tree.n_items)  # small trees: several users per call
    brute_force(model, tree, hist[:1], windows[:1], BRUTE_K, batch_size=1, node_chunk=chunk)
    users, seconds = 0, 0.0
    with Probe(model, args.device) as probe:
        while users < args.max_brute:
            n = min(per_call_users, args.max_brute - users)
            start = time.perf_counter()
            brute_force(
                model, tree, hist[users : users + n], windows[users : users + n], BRUTE_K,
                batch_size=n, node_chunk=chunk,
            )  # fmt: skip
            seconds += time.perf_counter() - start
            users += n
            if seconds >= args.brute_budget:
                break
    return {
        "brute_users_timed": users,
        "brute_ms_per_user": 1e3 * seconds / users,
        "brute_score_gflops": probe.score_pairs
        * flops["score_flop_per_node"]
        / probe.score_seconds
        / 1e9,
        "brute_node_chunk": chunk,
        "brute_users_per_call": per_call_users,
    }


def profile_batch(model, tree, hist, windows, k, batch, device) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        beam_search(model, tree, hist[:batch], windows[:batch], k, batch_size=batch)
        sync(device)
    return top_ops(prof)


HEADER = (
    f"{'model':<14}{'leaves':>9}{'depth':>6}{'k':>5}{'users/s':>10}{'batch ms':>17}"
    f"{'1-user ms':>15}{'nodes/user':>16}{'score GF/s':>11}{'matmul':>8}{'%':>5}"
    f"{'brute ms/user':>15}{'speedup':>9}"
)


def print_row(r: dict) -> None:
    extr = "*" if r["brute_users_timed"] < r["batch_users"] else " "
    print(
        f"{r['model']:<14}{r['leaves']:>9}{r['depth']:>6}{r['k']:>5}{r['users_per_s']:>10.0f}"
        f"{r['batch_ms_p50']:>8.0f}/{r['batch_ms_p99']:<8.0f}"
        f"{r['single_ms_p50']:>7.1f}/{r['single_ms_p99']:<7.1f}"
        f"{r['nodes_per_user']:>7.0f}/{r['max_nodes_per_user']:>4}<={r['nodes_bound']:<4}"
        f"{r['score_gflops']:>10.1f}{r['matmul_gflops']['2048x2048x2048']:>8.0f}"
        f"{r['score_pct_of_matmul_2048']:>5.0f}"
        f"{r['brute_ms_per_user']:>13.1f}{extr} {r['speedup_batched']:>8.0f}x",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--leaves", default="10000,100000,1000000")
    parser.add_argument("--full", action="store_true", help="add 4M leaves; longer runs")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ks", default="10,200")
    parser.add_argument("--batch", type=int, default=256, help="users per beam_search batch")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--max-batches", type=int, default=8)
    parser.add_argument("--min-single", type=int, default=20)
    parser.add_argument("--max-single", type=int, default=200)
    parser.add_argument("--brute-budget", type=float, default=3.0)
    parser.add_argument("--max-brute", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--out-name", default="beam_search", help="file stem of the JSON")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 like the CPU
    leaves = [int(s) for s in args.leaves.split(",") if s]
    if args.full:
        leaves = sorted(set(leaves) | {4_000_000})
        args.budget, args.max_single, args.min_single = 3 * args.budget, 1000, 100
        args.max_batches, args.brute_budget = 4 * args.max_batches, 3 * args.brute_budget
    models = [m for m in args.models.split(",") if m]
    ks = [int(s) for s in args.ks.split(",") if s]
    info = machine_info(args.device)
    load = info["load_average_1_5_15"]
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, load {load}")
    print(HEADER)
    print("-" * len(HEADER))
    results, profiles = [], {}
    rng = np.random.default_rng(args.seed)
    n_users = max(args.batch * args.max_batches, args.max_single, args.max_brute)
    for n in leaves:
        tree = Tree.from_ordered_items(rng.permutation(n), arity=2)
        hist, windows = make_users(n_users, n, rng)
        for name in models:
            cfg = ModelConfig(name=name)
            model = build_model(cfg, tree.n_nodes, WINDOWS, seed=args.seed).to(args.device).eval()
            flops = work_split(model, n, args.device)
            assert flops["score_flop_per_user_per_call"] == 0, f"{name}: per-user FLOPs in score"
            brute = run_brute(model, tree, hist, windows, args, flops)
            for k in ks:
                row = {"model": name, "leaves": n, "depth": tree.depth, **flops}
                row.update(run_config(model, tree, hist, windows, k, args, flops))
                row.update(brute)
                row["speedup_batched"] = row["brute_ms_per_user"] / row["ms_per_user_batched"]
                row["speedup_single_p50"] = row["brute_ms_per_user"] / row["single_ms_p50"]
                results.append(row)
                print_row(row)
            if not args.no_profile and n == max(leaves):
                profiles[name] = profile_batch(
                    model, tree, hist, windows, min(ks), args.batch, args.device
                )
            del model
    print(
        "batch ms: p50/p99 latency of one beam_search call on --batch users; 1-user ms: p50/p99 "
        "of a call on one user;\nnodes/user: mean/max scored per user <= the Algorithm 1 bound; "
        "score GF/s: FLOPs inside model.score / time there (best of 3 batches);\nmatmul: fp32 "
        "2048^3 GFLOP/s measured just before; %: score/matmul; * brute force timed on fewer users "
        "(per-user time extrapolated);\nspeedup: brute ms/user / batched beam ms/user."
    )
    for name, ops in profiles.items():
        print_ops(f"profile: {name}, {max(leaves)} leaves, k={min(ks)}, one batch", ops)
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    payload = {
        "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "profiles": profiles,
    }
    path = write_result(args.out, result_name(args.out_name, args.device, args.full), payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
