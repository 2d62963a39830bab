"The fused head + cross-entropy (`fused_lm_loss`) against the plain path, and the Trainer's use of it."
import math

import pytest
import torch
import torch.nn.functional as F

from llm_playground.trainer import Trainer, fused_lm_loss, lm_loss
from llm_playground.transformer import Transformer

FAST = dict(device="cpu", precision="fp32", progress=False, plot=False, log_steps=0, eval_steps=0, save_steps=0,
            sampling=dict(prompts=[], every_epoch=False))


def model(tie=True, seed=0, vocab=97):
    torch.manual_seed(seed)
    return Transformer(vocab_size=vocab, context_length=16, emb_dim=32, n_layers=1, n_heads=2, tie_weights=tie)


def batch(seed=0, B=3, T=16, V=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def grads(m, fused, prec, chunk_rows=None):
    "Loss and every parameter gradient of `m` on one batch, through the fused or the plain loss."
    m.zero_grad(set_to_none=True)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
        loss = fused_lm_loss(m.hidden_states(x), m.head.weight, y, chunk_rows) if fused else lm_loss(m(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_same_loss_and_gradients_fp32(tie, chunk_rows):
    m = model(tie)
    (lp, gp), (lf, gf) = grads(m, False, "fp32"), grads(m, True, "fp32", chunk_rows)
    torch.testing.assert_close(lf, lp, rtol=1e-6, atol=1e-6)
    assert gp.keys() == gf.keys() and ("head.weight" in gp) != tie
    for n in gp: torch.testing.assert_close(gf[n], gp[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 6, 5])  # 48 positions: 1 chunk; 8 (weight gradient summed in bf16); 10 (in fp32)
def test_bf16_as_close_to_fp32_as_the_plain_path(tie, chunk_rows):
    m = model(tie)
    (lr, gr), (lp, gp), (lf, gf) = grads(m, False, "fp32"), grads(m, False, "bf16"), grads(m, True, "bf16", chunk_rows)
    assert abs(lf - lp) < 1e-2 and abs(lf - lr) < 2e-2
    for n in gr:
        err_f, err_p = (gf[n] - gr[n]).norm(), (gp[n] - gr[n]).norm()
        assert err_f <= 2 * err_p + 5e-3 * gr[n].norm(), (n, err_f.item(), err_p.item())  # bf16 rounding, no worse than plain


def test_nothing_kept_for_an_evaluation():
    m = model()
    x, y = batch()
    with torch.no_grad(): loss = fused_lm_loss(m.hidden_states(x), m.head.weight, y)
    assert not loss.requires_grad and math.isclose(loss.item(), lm_loss(m(x), y).item(), rel_tol=1e-6)


def test_trainer_default_loss_is_fused_and_trains_like_the_plain_path():
    x, y = batch(B=8)
    data = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    runs = [Trainer(model(), data, cfg=dict(FAST, max_steps=4, fused_loss=f), default_cbs=False) for f in (True, False)]
    assert [t.fused for t in runs] == [True, False]
    for t in runs: t.fit()
    for a, b in zip(*(t.model.parameters() for t in runs)): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_custom_loss_gets_the_logits():
    seen = []
    def loss_func(logits, targets):
        seen.append(tuple(logits.shape)); return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    x, y = batch()
    t = Trainer(model(), [(x, y)], cfg=dict(FAST, max_steps=1), loss_func=loss_func, default_cbs=False)
    assert not t.fused
    t.fit()
    assert seen == [(3, 16, 97)]


def test_compile_with_fused_loss():
    x, y = batch()
    ts = [Trainer(model(), [(x, y)], cfg=dict(FAST, max_steps=1, compile=c), default_cbs=False).fit() for c in (True, False)]
    assert ts[0].fwd_hidden is not ts[0].model.hidden_states  # the trunk ran compiled
    torch.testing.assert_close(ts[0].loss, ts[1].loss, rtol=1e-4, atol=1e-5)


def test_loss_func_swapped_after_init_is_used():
    "A callback (or a user) may replace `loss_func` mid-run: the fused path must not keep computing the old loss."
    x, y = batch()
    t = Trainer(model(), [(x, y)], cfg=dict(FAST, max_steps=1), default_cbs=False)
    assert t.fused
    t.loss_func = lambda logits, targets: lm_loss(logits, targets) * 0 + 123.0
    assert not t.fused and t._loss(x, y).item() == 123.0


def head_case(h, W, y, fused, prec, chunk_rows=None):
    "Loss and gradients of hidden states and head weight for given tensors, through the fused or the plain path."
    h, W = h.clone().requires_grad_(), W.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
        loss = fused_lm_loss(h, W, y, chunk_rows) if fused else lm_loss(h @ W.T, y)
    loss.backward()
    return loss.detach(), h.grad, W.grad


def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("chunk_rows", [None, 8])
def test_bf16_confident_targets_keep_their_gradient(chunk_rows):
    "Targets the model is sure of (p > 0.998, which rounds to 1 in bf16) still get their small loss and gradient."
    g = torch.Generator().manual_seed(0)
    W, y = torch.randn(300, 32, generator=g) * 0.3, torch.randint(0, 300, (4, 16), generator=g)
    h = W[y] * 8 + 0.1 * torch.randn(4, 16, 32, generator=g)  # median p(target) 0.99998
    ref, plain, fused = head_case(h, W, y, False, "fp32"), head_case(h, W, y, False, "bf16"), head_case(h, W, y, True, "bf16", chunk_rows)
    assert abs(fused[0] - ref[0]) <= 0.02 * ref[0], (fused[0], ref[0])
    for f, p, r in zip(fused[1:], plain[1:], ref[1:]): assert rel(f, r) <= 1.5 * rel(p, r) + 1e-3, (rel(f, r), rel(p, r))


def test_bf16_ignored_targets():
    g = torch.Generator().manual_seed(1)
    h, W, y = torch.randn(2, 24, 32, generator=g), torch.randn(97, 32, generator=g) * 0.3, torch.randint(0, 97, (2, 24), generator=g)
    y[0, :5] = y[1, -3:] = -100
    plain, fused = head_case(h, W, y, False, "bf16"), head_case(h, W, y, True, "bf16", 7)
    assert abs(fused[0] - plain[0]) < 1e-2 and fused[1][0, :5].abs().sum() == 0 and fused[1][1, -3:].abs().sum() == 0
    assert rel(fused[1], plain[1]) < 2e-2 and rel(fused[2], plain[2]) < 2e-2


def test_fp16_keeps_small_probabilities():
    "fp16 (the CUDA precision where bf16 is missing) computes the probabilities in fp32: targets far below fp16's 6e-8 still count."
    g = torch.Generator().manual_seed(0)
    h, W, y = torch.randn(4, 16, 32, generator=g) * 1.5, torch.randn(300, 32, generator=g) * 1.5, torch.randint(0, 300, (4, 16), generator=g)
    ref = lm_loss(h @ W.T, y)
    assert ref > 30  # most targets have probabilities fp16 cannot hold
    hf, Wf = h.half().requires_grad_(), W.half().requires_grad_()
    loss = fused_lm_loss(hf, Wf, y); loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item() and torch.isfinite(Wf.grad).all()


def test_an_empty_batch_gives_nan_as_the_plain_path():
    h, W, y = torch.randn(0, 8), torch.randn(11, 8), torch.zeros(0, dtype=torch.long)
    assert math.isnan(fused_lm_loss(h, W, y).item()) and math.isnan(F.cross_entropy(h @ W.T, y).item())
