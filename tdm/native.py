"""Beam search in C for the built-in scorers on the CPU (``beam_search(..., backend="native")``).

One user's search at 1M leaves scores ~16 levels of ~40 nodes. The torch path
(``tdm.retrieval``) runs ~40 small tensor operations per level, and at one user per call their
dispatch costs more than their arithmetic (docs/PERFORMANCE.md, section 5). ``tdm/csrc/beam.c``
runs Algorithm 1 for one user at a time in plain C, with the same formulas, for the built-in
``DNN``, ``AttentionDNN`` and ``ProductDNN`` (``model.node_bias`` included). It also builds what
depends on the user alone (``user_state``: the activation unit's first layer per behaviour, the
first FC layer's share of the window averages) from the behaviours; only the product-DNN's user
vector still comes from torch. The weights are laid out for it here once per state of the
weights, in eval mode (BatchNorms folded into their Linear layers), whatever mode the model is
in.

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``; ``-O3 -march=native``) into a cache folder (``$TDM_NATIVE_CACHE``, else
``~/.cache/tdm-flow/native``), once per source, compiler and CPU, and loaded with ctypes, which
lets other Python threads run during a search. Without a compiler, or with ``TDM_NATIVE=0``,
``available()`` is False and ``reason()`` says why; ``backend="auto"`` then uses torch.

Results equal the torch path's up to rounding (other summation orders, fused multiply-adds):
``tests/test_native.py`` compares the two on trees with leaves at several depths, exclusions,
node biases, padded histories and every built-in model.

Layouts (float32, C order; FC widths padded with zeros to multiples of 8, the activation unit's
hidden size H to a multiple of 4, so that padding adds nothing): the first layer's node columns
transposed (D, H1), its window columns as (W, D, H1), every further layer transposed (in, out);
for the unit ``A3``, ``A2 - A4`` and ``A1 + A4`` transposed (D, H), its first bias, and the
linear and ReLU shares of its PReLU and output layer (``AttentionDNN``'s docstring).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tdm.model import DNN, AttentionDNN, ProductDNN

logger = logging.getLogger(__name__)

__all__ = ["available", "reason", "search", "unsupported"]

SOURCE = Path(__file__).with_name("csrc") / "beam.c"
FLAGS = ("-O3", "-std=c11", "-ffp-contract=fast", "-shared", "-fPIC", "-fno-math-errno")
_KINDS = {DNN: 0, AttentionDNN: 1, ProductDNN: 2}
MAX_WINDOWS = 64  # beam.c's

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _r8(n: int) -> int:
    return (n + 7) // 8 * 8


def _r4(n: int) -> int:
    return (n + 3) // 4 * 4


# ----------------------------------------------------------------------------- the library
def _cache_dir() -> Path:
    env = os.environ.get("TDM_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tdm-flow" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the machine and its CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compile(cc: str, out: Path) -> None:
    """Compile ``SOURCE`` into ``out`` (atomically: a temp file, then a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem, suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, "-march=native", "-o", tmp, str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:  # without -march=native the kernels run 10x slower: no C
            raise OSError(f"{' '.join(cmd)}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found ($CC, cc, gcc or clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), version.encode(), " ".join(FLAGS).encode()):
        key.update(part)
    key.update(_cpu_fingerprint().encode())
    path = _cache_dir() / f"beam-{key.hexdigest()[:20]}.so"
    if not path.exists():
        logger.info("compiling %s into %s", SOURCE.name, path)
        _compile(cc, path)
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.tdm_beam_search.argtypes = [p, p, i64, p, p, i64, p, p, p, i64, i64, p, p, p]
    lib.tdm_beam_search.restype = ctypes.c_int64
    lib.tdm_user_floats.argtypes = [p, ctypes.c_int64]
    lib.tdm_user_floats.restype = ctypes.c_int64
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("TDM_NATIVE", "1") == "0":
                _error = "TDM_NATIVE=0"
            else:
                try:
                    _lib = _load()
                except (OSError, subprocess.SubprocessError) as exc:
                    _error = f"the C search could not be built: {exc}"
                    logger.warning("%s; beam search uses torch", _error)
        return _lib


def available() -> bool:
    """Whether the C search is built and loaded (building it on the first call)."""
    return _library() is not None


def reason() -> str | None:
    """Why the C search is not available, or None when it is."""
    _library()
    return _error


# ----------------------------------------------------------------------------- C structures
class _Tree(ctypes.Structure):
    _fields_ = [("n_nodes", ctypes.c_int64), ("depth", ctypes.c_int64)] + [
        (name, ctypes.c_void_p)
        for name in ("child_start", "child_count", "rows", "node_item", "is_leaf")
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("table_stride", ctypes.c_int64),
        ("table", ctypes.c_void_p),
        ("node_bias", ctypes.c_void_p),
        ("n_layers", ctypes.c_int64),
        ("width", ctypes.c_void_p),
        ("w_node", ctypes.c_void_p),
        ("slope0", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("slope", ctypes.c_void_p),
        ("w_out", ctypes.c_void_p),
        ("b_out", ctypes.c_float),
        ("hq", ctypes.c_int64),
        ("w_pos", ctypes.c_void_p),
        ("windows", ctypes.c_int64),
        ("b1", ctypes.c_void_p),
        ("w1w", ctypes.c_void_p),
        ("a3t", ctypes.c_void_p),
        ("a24t", ctypes.c_void_p),
        ("a14t", ctypes.c_void_p),
        ("a_bias", ctypes.c_void_p),
        ("w_lin", ctypes.c_void_p),
        ("unit_bias", ctypes.c_float),
    ]


def _pad(t: torch.Tensor, size: int, dim: int = -1) -> torch.Tensor:
    """``t`` padded with zeros to ``size`` along ``dim``."""
    dim = dim % t.dim()
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    return F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, extra])


def _host(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


# ----------------------------------------------------------------------------- the packed model
def unsupported(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why ``model`` cannot be searched in C on ``device``, or None when it can.

    Checked once per state of the weights (``_entry``): beam search asks at every call."""
    if device.type != "cpu":
        return f"the C search runs on the CPU, not {device.type}"
    if type(model) not in _KINDS:
        return f"the C search knows the built-in models, not {type(model).__name__}"
    return _entry(model).reason or reason()


def _why(model: torch.nn.Module, tensors: list[torch.Tensor]) -> str | None:
    for t in tensors:
        if t.is_floating_point() and t.dtype != torch.float32:
            return f"the C search needs float32 weights, not {t.dtype}"
    if model.time_windows > MAX_WINDOWS:
        return f"the C search handles up to {MAX_WINDOWS} time windows"
    if model.embedding.weight.stride(1) != 1:
        return "the C search needs a contiguous embedding table"
    head = getattr(model, "head", None)
    if head is not None and not all(
        isinstance(a, torch.nn.PReLU) for a in list(head.rest)[2::3] + [head.first_norm[1]]
    ):
        return "the C search needs PReLU activations"
    return None


@dataclass(eq=False)
class _Packed:
    """A model's weights in the C layout."""

    kind: int
    struct: _Model
    keep: list  # the arrays the struct points into
    width0: int


@dataclass(eq=False)
class _Entry:
    """What is known of one model while its weights are unchanged (``key``: each parameter's
    and buffer's in-place version, storage and dtype; an optimizer step, ``load_state_dict``
    or ``.double()`` changes it). Parameters replaced by new objects are not seen: give the C
    search the changed model as a new module."""

    tensors: list[torch.Tensor]
    key: tuple = ()
    reason: str | None = None
    packed: _Packed | None = None


_ENTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _entry(model: torch.nn.Module) -> _Entry:
    entry = _ENTRIES.get(model)
    if entry is None:
        entry = _Entry([*model.parameters(), *model.buffers()])
        _ENTRIES[model] = entry
    key = tuple((t._version, t.data_ptr(), t.dtype) for t in entry.tensors)
    if key != entry.key:
        entry.key, entry.reason, entry.packed = key, _why(model, entry.tensors), None
    return entry


@contextlib.contextmanager
def _eval(model: torch.nn.Module):
    """Every module in eval mode for the block; each module's mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _pack(model: torch.nn.Module) -> _Packed:
    """The model's weights for C (in eval mode: BatchNorms folded), once per weights state."""
    entry = _entry(model)
    if entry.packed is None:
        with _eval(model), torch.inference_mode():
            entry.packed = _packed(model)
    return entry.packed


def _packed(model: torch.nn.Module) -> _Packed:
    kind = _KINDS[type(model)]
    D = model.dim
    table = model.embedding.weight.detach()
    keep: list = [table]
    s = _Model(kind=kind, dim=D, table_stride=table.stride(0), table=table.data_ptr())
    if model.node_bias is not None:
        bias = _host(model.node_bias.weight.view(-1))
        keep.append(bias)
        s.node_bias = bias.ctypes.data
    width0 = 0
    if kind != 2:
        head = model.head
        w1, b1 = head.first_params()  # (H1, W*D + D), BatchNorm folded in eval mode
        h1 = w1.shape[0]
        width0 = _r8(h1)
        layers = list(head.rest)
        triples = list(zip(layers[0::3], layers[1::3], layers[2::3], strict=True))
        widths = [width0] + [_r8(linear.out_features) for linear, _, _ in triples]
        arrays = {"width": np.asarray(widths, dtype=np.int64)}
        arrays["w_node"] = _host(_pad(w1[:, -D:].t(), width0))
        arrays["slope0"] = _host(_pad(head.first_norm[1].weight.expand(h1), width0))
        ws, bs, slopes = [], [], []
        for i, (linear, norm, act) in enumerate(triples, start=1):
            w, b = head._fold(i, linear, norm)
            ws.append(_host(_pad(_pad(w.t(), widths[i - 1], 0), widths[i])))
            bs.append(_host(_pad(b, widths[i])))
            slopes.append(_host(_pad(act.weight.expand(linear.out_features), widths[i])))
        arrays["w_out"] = _host(_pad(head.out.weight.view(-1), widths[-1]))
        keep += [*arrays.values(), *ws, *bs, *slopes]
        pointers = [
            (ctypes.c_void_p * max(len(a), 1))(*[x.ctypes.data for x in a])
            for a in (ws, bs, slopes)
        ]
        keep += pointers
        s.n_layers = len(triples)
        s.width, s.w_node, s.slope0 = (arrays[n].ctypes.data for n in ("width", "w_node", "slope0"))
        s.w, s.b, s.slope = (ctypes.cast(p, ctypes.c_void_p) for p in pointers)
        s.w_out = arrays["w_out"].ctypes.data
        s.b_out = float(head.out.bias)
        W = model.time_windows
        s.windows = W
        firsts = {
            "b1": _pad(b1, width0),
            "w1w": _pad(w1[:, : W * D].t().reshape(W, D, h1), width0),  # (W, D, W0)
        }
        if kind == 1:
            A, hidden = model.attention_in.weight, model.attention_in.out_features  # (H, 4D)
            A1, A2, A3, A4 = (A[:, i * D : (i + 1) * D] for i in range(4))
            out_weight, slope = model.attention_out.weight.view(-1), model.attention_act.weight
            hq = _r4(hidden)
            firsts |= {  # as AttentionDNN.user_state builds its state
                "a3t": _pad(A3.t(), hq),
                "a24t": _pad((A2 - A4).t(), hq),
                "a14t": _pad((A1 + A4).t(), hq),
                "a_bias": _pad(model.attention_in.bias, hq),
                "w_lin": _pad(out_weight * slope, hq),
                "w_pos": _pad(out_weight * (1 - slope), hq),
            }
            s.hq, s.unit_bias = hq, float(model.attention_out.bias)
        for name, value in firsts.items():
            array = _host(value)
            keep.append(array)
            setattr(s, name, array.ctypes.data)
    return _Packed(kind, s, keep, width0)


def search(
    model: torch.nn.Module,
    tt,
    hist: torch.Tensor,
    windows: torch.Tensor,
    k: int,
    excluded: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Algorithm 1 (ranking ``"node"``) for one batch of users in C.

    Check ``unsupported`` first. The model's modes do not matter: the weights are laid out in
    eval mode (the BatchNorms folded), and the torch part (the product-DNN's user vector) runs
    in eval mode too; every module's mode is left as it was.

    Args:
        model: a built-in scorer on the CPU.
        tt: the tree's ``tdm.retrieval.TreeTensors`` on the CPU.
        hist, windows: (B, L) int64 model inputs.
        k: beam width and items returned (at most the number of items).
        excluded: CSR ``(nodes, offsets)`` of sorted node ids per user never to enter the beam
            or the result, or None.
    Returns:
        items (B, k) int64 padded with -1, scores (B, k) float32 padded with -inf, nodes scored
        (B,) int64, and the number of levels scored in all.
    """
    lib = _library()
    packed = _pack(model)
    B, L = hist.shape
    hist = np.ascontiguousarray(hist.numpy(), dtype=np.int64)
    windows = np.ascontiguousarray(windows.numpy(), dtype=np.int64)
    rows = model.embedding.num_embeddings
    if hist.size and int(hist.max()) >= rows:  # C would read past the table; torch raises
        raise IndexError(f"behaviour row {int(hist.max())} outside the embedding table ({rows})")
    users = None
    if packed.kind == 2:  # product-DNN: the user vector from torch
        with _eval(model), torch.inference_mode():
            state = model.user_state(torch.as_tensor(hist), torch.as_tensor(windows))
        users = _host(_pad(state, _r8(model.dim)))
    if excluded is None:
        nodes, offsets = np.zeros(1, np.int64), np.zeros(B + 1, np.int64)
    else:
        nodes, offsets = (np.ascontiguousarray(a, dtype=np.int64) for a in excluded)
        nodes = nodes if len(nodes) else np.zeros(1, np.int64)
    tree = _Tree(
        n_nodes=tt.n_nodes,
        depth=tt.depth,
        child_start=tt.child_start.data_ptr(),
        child_count=tt.child_count.data_ptr(),
        rows=tt.rows.data_ptr(),
        node_item=tt.node_item.data_ptr(),
        is_leaf=tt.is_leaf.data_ptr(),
    )
    items = np.empty((B, k), dtype=np.int64)
    scores = np.empty((B, k), dtype=np.float32)
    scored = np.empty(B, dtype=np.int64)
    calls = lib.tdm_beam_search(
        ctypes.byref(tree),
        ctypes.byref(packed.struct),
        B,
        hist.ctypes.data,
        windows.ctypes.data,
        L,
        None if users is None else users.ctypes.data,
        nodes.ctypes.data,
        offsets.ctypes.data,
        k,
        tt.max_arity,
        items.ctypes.data,
        scores.ctypes.data,
        scored.ctypes.data,
    )
    if calls < 0:
        raise MemoryError("the C beam search could not allocate its buffers")
    return items, scores, scored, int(calls)
