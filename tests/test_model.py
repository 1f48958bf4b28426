"""Scorers: the split computations equal their naive definitions (Sec. 3.4, Fig. 2, Sec. 5.4)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch.autograd import gradcheck

import tdm.model as model_mod
from tdm.config import ModelConfig
from tdm.model import (
    MODELS,
    AttentionDNN,
    AttentionState,
    build_model,
    frozen,
    resolve_model_class,
    select_state,
    window_weights,
)

SMALL = dict(embedding_dim=6, attention_hidden=5, hidden=[16, 8, 6])
N_EMB, W = 40, 3


def make_inputs(B=5, L=7, N=4, seed=0, pad=3):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, N_EMB, (B, L), generator=g)
    windows = torch.randint(0, W, (B, L), generator=g)
    hist[0, :pad] = -1
    windows[0, :pad] = -1
    hist[1, :] = -1  # a user with no history at all
    windows[1, :] = -1
    nodes = torch.randint(1, N_EMB, (B, N), generator=g)
    return hist, windows, nodes


def randomised(name: str, dtype=torch.float64) -> torch.nn.Module:
    """A model in eval mode with all weights and BN statistics randomised (not near identity)."""
    model = build_model(ModelConfig(name=name, **SMALL), N_EMB, W, seed=1).to(dtype)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def naive_windows(weights, emb, hist, windows):
    """(B, N, W*D) per-window weighted sum / count, straight from the definition."""
    valid = hist >= 0
    out = []
    for w in range(W):
        in_w = (valid & (windows == w)).to(emb.dtype)  # (B, L)
        count = in_w.sum(1).clamp_min(1)  # (B,)
        out.append(torch.einsum("bnl,bl,bld->bnd", weights, in_w, emb) / count[:, None, None])
    return torch.cat(out, dim=-1)


def naive_attention(model: AttentionDNN, hist, windows, nodes):
    """Fig. 2 with the 4D concatenation [e_b, e_n, e_b*e_n, e_b-e_n] materialised."""
    B, L = hist.shape
    N = nodes.shape[1]
    e_b = model.embedding(hist.clamp_min(0))  # (B, L, D)
    e_n = model.embedding(nodes)  # (B, N, D)
    b = e_b[:, None].expand(B, N, L, -1)
    n = e_n[:, :, None].expand(B, N, L, -1)
    x = torch.cat([b, n, b * n, b - n], dim=-1)  # (B, N, L, 4D)
    a = model.attention_out(model.attention_act(model.attention_in(x))).squeeze(-1)  # (B, N, L)
    h = torch.cat([naive_windows(a, e_b, hist, windows), e_n], dim=-1)
    return naive_head(model.head, h)


def naive_head(head, h):
    """The FC layers module by module, BatchNorm as its own step: (B, N, n_in) -> (B, N)."""
    B, N, _ = h.shape
    h = head.rest(head.first_norm(head.first(h).reshape(B * N, -1)))
    return head.out(h).view(B, N)


def naive_dnn(model, hist, windows, nodes):
    """TDM DNN with weights 1.0 and the first FC layer applied to the concatenation."""
    e_b = model.embedding(hist.clamp_min(0))
    e_n = model.embedding(nodes)
    ones = torch.ones(nodes.shape + hist.shape[1:], dtype=e_b.dtype)  # (B, N, L)
    h = torch.cat([naive_windows(ones, e_b, hist, windows), e_n], dim=-1)
    return naive_head(model.head, h)


@pytest.fixture(params=sorted(MODELS))
def name(request):
    return request.param


def test_contract_shapes_state_and_select(name):
    model = randomised(name, torch.float32)
    hist, windows, nodes = make_inputs()
    logits = model(hist, windows, nodes)
    assert logits.shape == nodes.shape and torch.isfinite(logits).all()
    state = model.user_state(hist, windows)
    torch.testing.assert_close(model.score(state, nodes), logits)
    idx = torch.tensor([3, 0])
    torch.testing.assert_close(model.score(select_state(state, idx), nodes[idx]), logits[idx])
    assert model.embedding.num_embeddings == N_EMB
    with torch.no_grad():  # retrieval's state too: every part has the user dimension first
        for each in (state, model.user_state(hist, windows)):
            parts = [each] if isinstance(each, torch.Tensor) else each
            assert all(t.shape[0] == hist.shape[0] for t in parts if t is not None)


def test_select_state_keeps_tensors_tuples_and_named_tuples():
    a, b = torch.arange(5), torch.arange(10).view(5, 2)
    idx = torch.tensor([4, 1])
    assert torch.equal(select_state(a, idx), a[idx])  # a user model's tensor state
    picked = select_state((a, b), slice(1, 3))  # a plain tuple stays a plain tuple
    assert type(picked) is tuple and torch.equal(picked[1], b[1:3])
    state = AttentionState(a, b, a * 2)  # no unit: None parts stay None
    picked = select_state(state, torch.tensor([True, False, True, False, False]))
    assert isinstance(picked, AttentionState) and picked.unit is None and picked.linear is None
    assert picked.emb.tolist() == [0, 2] and picked.spread.tolist() == [0, 4]


def test_padding_does_not_change_output(name):
    model = randomised(name)
    hist, windows, nodes = make_inputs(pad=0)
    hist, windows = hist[2:], windows[2:]
    nodes = nodes[2:]
    base = model(hist, windows, nodes)
    pad = torch.full((hist.shape[0], 4), -1)
    longer = model(torch.cat([pad, hist], 1), torch.cat([pad, windows], 1), nodes)
    torch.testing.assert_close(longer, base)
    # padding looks up row 0 (clamped); its value must not matter
    with torch.no_grad():
        model.embedding.weight[0] += 3.0
    torch.testing.assert_close(
        model(torch.cat([pad, hist], 1), torch.cat([pad, windows], 1), nodes), base
    )


def test_attention_split_equals_naive_concatenation(monkeypatch):
    model = randomised("attention_dnn")
    hist, windows, nodes = make_inputs()
    for chunk_elements in (1, 100, 1 << 21):  # several users per chunk, one, all
        monkeypatch.setattr(model_mod, "CPU_CHUNK_ELEMENTS", chunk_elements)
        torch.testing.assert_close(
            model(hist, windows, nodes), naive_attention(model, hist, windows, nodes)
        )


def test_attention_inference_state_carries_pair_weights_and_scores_the_same(monkeypatch):
    model = randomised("attention_dnn")
    hist, windows, nodes = make_inputs()
    ref = naive_attention(model, hist, windows, nodes)
    B, L = hist.shape
    D, H = SMALL["embedding_dim"], SMALL["attention_hidden"]
    with torch.no_grad():
        state = model.user_state(hist, windows)
        # retrieval: the unit and its linear share are built once per user
        assert isinstance(state, AttentionState)
        assert state.emb.shape == (B, L, D) and state.user_part.shape == (B, L, H)
        assert state.spread.shape == (B, L, W * D)
        assert state.unit.shape == (B, D + 1, L * H) and state.linear.shape == (B, D + 1, L)
        for chunk_elements in (1, 100, 1 << 21):
            monkeypatch.setattr(model_mod, "CPU_CHUNK_ELEMENTS", chunk_elements)
            torch.testing.assert_close(model.score(state, nodes), ref)
        idx = torch.tensor([3, 0])
        picked = select_state(state, idx)
        assert isinstance(picked, AttentionState)
        torch.testing.assert_close(picked.unit, state.unit[idx])
        torch.testing.assert_close(model.score(picked, nodes[idx]), ref[idx])
    training = model.user_state(hist, windows)  # training: the unit is built chunk by chunk
    assert training.unit is None and training.linear is None
    picked = select_state(training, idx)
    assert isinstance(picked, AttentionState) and picked.unit is None and picked.linear is None
    torch.testing.assert_close(model.score(picked, nodes[idx]), ref[idx])


def test_attention_split_gradients_equal_naive():
    model = randomised("attention_dnn")
    model.train()
    hist, windows, nodes = make_inputs()
    target = torch.randn(nodes.shape, dtype=torch.float64)

    def grads(fn):
        model.zero_grad()
        ((fn(model, hist, windows, nodes) - target) ** 2).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    fast = grads(lambda m, *a: m(*a))
    slow = grads(naive_attention)
    for key in slow:
        torch.testing.assert_close(fast[key], slow[key], msg=key)


def test_activation_unit_gradcheck():
    d = torch.float64
    g = torch.Generator().manual_seed(0)
    B, N, L, H, D = 3, 4, 5, 6, 2
    shapes = [(B, N, D), (B, L, D), (H, D), (B, L, H), (B, N, H), (1,), (H,), (1,)]
    inputs = [torch.randn(s, generator=g, dtype=d, requires_grad=True) for s in shapes]
    for chunk in (1, 2, B):
        assert gradcheck(lambda *a, c=chunk: model_mod._ActivationUnit.apply(*a, c), inputs)


def test_dnn_split_first_layer_equals_concatenation():
    model = randomised("dnn")
    hist, windows, nodes = make_inputs()
    torch.testing.assert_close(model(hist, windows, nodes), naive_dnn(model, hist, windows, nodes))


def test_product_dnn_logit_is_inner_product():
    model = randomised("product_dnn")
    hist, windows, nodes = make_inputs()
    user = model.user_state(hist, windows)  # (B, D)
    expected = torch.einsum("bd,bnd->bn", user, model.embedding(nodes))
    torch.testing.assert_close(model.score(user, nodes), expected)
    # linear in the node embedding: e = 2 e1 - 3 e2 gives 2 s1 - 3 s2
    with torch.no_grad():
        w = model.embedding.weight
        w[0] = 2 * w[5] - 3 * w[6]
    rows = torch.tensor([[5, 6, 0]]).expand(hist.shape[0], 3)
    s = model.score(user, rows)
    torch.testing.assert_close(s[:, 2], 2 * s[:, 0] - 3 * s[:, 1])


def test_window_weights_average_per_window():
    hist = torch.tensor([[-1, 4, 5, 6, 7]])
    windows = torch.tensor([[-1, 0, 2, 2, 2]])
    w = window_weights(hist, windows, 4)  # (1, 5, 4)
    assert w[0, 0].sum() == 0  # padding
    torch.testing.assert_close(w[0, :, 0], torch.tensor([0, 1.0, 0, 0, 0]))
    torch.testing.assert_close(w[0, :, 2], torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3]))
    assert w[0, :, 1].sum() == 0 and w[0, :, 3].sum() == 0  # empty windows -> zero vectors


def test_autocast_bfloat16_runs_and_is_close(name):
    model = build_model(ModelConfig(name=name, **SMALL), N_EMB, W, seed=0).eval()
    hist, windows, nodes = make_inputs()
    ref = model(hist, windows, nodes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(hist, windows, nodes)
        out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_inference_mode_scoring(name):
    model = build_model(ModelConfig(name=name, **SMALL), N_EMB, W, seed=0).eval()
    hist, windows, nodes = make_inputs()
    ref = model(hist, windows, nodes).detach()
    with torch.inference_mode():
        state = model.user_state(hist, windows)
        out = model.score(state, nodes[:, :1].expand(-1, 3))  # expanded (strided) rows
    torch.testing.assert_close(out[:, 0], ref[:, 0])


@pytest.mark.parametrize("name", ["dnn", "attention_dnn"])
def test_kept_batchnorm_folds_follow_weight_changes(name):
    """Eval scoring reuses the folded BatchNorm weights between calls, but never stale ones: an
    in-place update (optimizer step, load_state_dict) or a replaced parameter is seen, and a
    call that records gradients folds afresh (its gradients reach the BatchNorm)."""
    model = randomised(name)
    hist, windows, nodes = make_inputs()
    with torch.no_grad():
        first = model(hist, windows, nodes)
        assert torch.equal(model(hist, windows, nodes), first)
        model.head.rest[1].running_mean.add_(0.5)  # in place: the fold must change
        moved = model(hist, windows, nodes)
    assert not torch.allclose(moved, first)
    fresh = randomised(name)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(hist, windows, nodes), moved)
        model.load_state_dict(randomised(name).state_dict())  # copy_: versions move
        other = randomised(name)(hist, windows, nodes)
        torch.testing.assert_close(model(hist, windows, nodes), other)
        model.head.first.weight = torch.nn.Parameter(model.head.first.weight * 2)  # replaced
        doubled = model(hist, windows, nodes)
    assert not torch.allclose(doubled, first)
    with torch.no_grad():
        model.head.first.weight.data = model.head.first.weight.data / 2  # storage swapped
        torch.testing.assert_close(model(hist, windows, nodes), first)
    model(hist, windows, nodes).sum().backward()
    assert model.head.rest[1].weight.grad is not None  # the BatchNorm's gamma
    assert model.head.first_norm[0].weight.grad is not None


@pytest.mark.parametrize("name", ["dnn", "attention_dnn"])
def test_frozen_reuses_folds_inside_the_block_and_checks_again_after_it(name):
    """``frozen`` (beam search) checks the folds once per block: a weight changed inside a block
    is not seen there (the caller promised none would change), but the next block and any call
    outside see it; nested blocks keep the pin until the outermost one ends."""
    model = randomised(name).eval()
    hist, windows, nodes = make_inputs()
    with torch.no_grad():
        first = model(hist, windows, nodes)
        with frozen(model):
            assert torch.equal(model(hist, windows, nodes), first)
            model.head.rest[1].running_mean.add_(0.5)
            with frozen(model):  # nested: still pinned
                assert torch.equal(model(hist, windows, nodes), first)
            assert torch.equal(model(hist, windows, nodes), first)
        moved = model(hist, windows, nodes)  # outside: checked, so refolded
        assert not torch.allclose(moved, first)
        with frozen(model):
            torch.testing.assert_close(model(hist, windows, nodes), moved)
    assert model.head._pinned is None and model.head._pin_depth == 0


def test_build_model_seed_is_deterministic_and_local():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(ModelConfig(**SMALL), N_EMB, W, seed=7)
    after = torch.rand(1)
    b = build_model(ModelConfig(**SMALL), N_EMB, W, seed=7)
    assert torch.equal(before, after)  # global RNG untouched
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_user_model_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Dot(nn.Module):
                def __init__(self, n_embeddings, cfg, time_windows):
                    super().__init__()
                    self.cfg, self.time_windows = cfg, time_windows
                    self.embedding = nn.Embedding(n_embeddings, cfg.embedding_dim)

                def user_state(self, hist, windows):
                    mask = (hist >= 0).unsqueeze(-1)
                    return (self.embedding(hist.clamp_min(0)) * mask).sum(1)

                def score(self, state, node_rows):
                    return torch.einsum("bd,bnd->bn", state, self.embedding(node_rows))

                def forward(self, hist, windows, node_rows):
                    return self.score(self.user_state(hist, windows), node_rows)

            NOT_A_MODULE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(ModelConfig(name="my_scorers:Dot", **SMALL), N_EMB, W)
    hist, windows, nodes = make_inputs()
    assert model(hist, windows, nodes).shape == nodes.shape
    with pytest.raises(ValueError, match="model.node_bias"):  # Dot has no per-node bias
        build_model(ModelConfig(name="my_scorers:Dot", node_bias=True, **SMALL), N_EMB, W)
    for bad, words in [
        ("no_such_module_xyz:Foo", "cannot import"),
        ("my_scorers:Missing", "has no 'Missing'"),
        ("my_scorers:NOT_A_MODULE", "not a torch.nn.Module"),
        ("attention", "unknown model"),
    ]:
        with pytest.raises(ValueError, match="model.name") as err:
            resolve_model_class(bad)
        assert words in str(err.value) and bad in str(err.value)


def test_node_bias_adds_a_per_node_term_to_every_built_in(name):
    plain = randomised(name)
    biased = build_model(ModelConfig(name=name, node_bias=True, **SMALL), N_EMB, W, seed=1)
    biased = biased.to(torch.float64).eval()
    biased.load_state_dict({**plain.state_dict(), "node_bias.weight": biased.node_bias.weight})
    hist, windows, nodes = make_inputs()
    with torch.no_grad():
        assert torch.equal(biased(hist, windows, nodes), plain(hist, windows, nodes))  # zero init
        biased.node_bias.weight.copy_(torch.randn(N_EMB, 1, dtype=torch.float64))
        want = plain(hist, windows, nodes) + biased.node_bias.weight[nodes, 0]
        torch.testing.assert_close(biased(hist, windows, nodes), want)
        inference = biased.score(biased.user_state(hist, windows), nodes)  # retrieval path
        torch.testing.assert_close(inference, want)
    assert "node_bias" not in dict(plain.named_parameters())
