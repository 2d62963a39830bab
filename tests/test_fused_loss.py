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
def test_bf16_as_close_to_fp32_as_the_plain_path(tie):
    m = model(tie)
    (lr, gr), (lp, gp), (lf, gf) = grads(m, False, "fp32"), grads(m, False, "bf16"), grads(m, True, "bf16", 5)
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
