"""Issue 9's CUDA-only checks: fp16 with GradScaler, CUDA bf16 autocast, the fused loss and the bf16 attention on the GPU,
`torch.compile`, pinned memory. They skip without a GPU (CI has none); `bench/gpu.sh` runs them on a lent one.
`LP_TEST_DEVICE=cpu` runs the ones that make sense on a CPU too, to check the tests themselves."""
import os

import numpy as np
import pytest
import torch

from llm_playground.dataloader import NextTokenPredictionDataset, create_dataloader
from llm_playground.trainer import Trainer, fused_lm_loss, lm_loss
from llm_playground.transformer import Transformer

DEV = os.environ.get("LP_TEST_DEVICE", "cuda")
needs_device = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")
cuda_only = pytest.mark.skipif(DEV != "cuda" or not torch.cuda.is_available(), reason="needs CUDA")
FAST = dict(device=DEV, progress=False, plot=False, log_steps=0, eval_steps=0, save_steps=0, sampling=dict(prompts=[], every_epoch=False))


def data(n=64, T=32, V=97, seed=0):
    "A learnable sequence: each token is the previous one plus 1 (mod V), from random starts."
    g = np.random.default_rng(seed)
    ids = (np.arange(n * (T + 1)) + np.repeat(g.integers(0, V, n), T + 1)) % V
    return create_dataloader(NextTokenPredictionDataset(ids, max_length=T), batch_size=8, seed=0, pin_memory=False)


def model(V=97, seed=0):
    torch.manual_seed(seed)
    return Transformer(vocab_size=V, context_length=32, emb_dim=64, n_layers=2, n_heads=4)


def losses(t):
    "Train `t`, returning the loss of every step."
    seen = []
    t.cbs.append(type("Losses", (), dict(order=1000, after_step=lambda self, tr: seen.append(float(tr.loss))))())
    t.fit()
    return seen


@cuda_only
def test_fp16_with_gradscaler_trains():
    t = Trainer(model(), data(), cfg=dict(FAST, precision="fp16", max_steps=30), default_cbs=False)
    seen = losses(t)
    assert t.precision == "fp16" and t.scaler.is_enabled() and t.scaler.get_scale() > 0
    assert np.isfinite(seen).all() and np.mean(seen[-5:]) < 0.85 * np.mean(seen[:5]), seen


@needs_device
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_autocast_training_and_fused_loss(precision):
    "Training in `precision` on the device learns; the fused loss (bf16 probabilities, bf16 attention on CPU) matches the plain one."
    t = Trainer(model(), data(), cfg=dict(FAST, precision=precision, max_steps=30), default_cbs=False)
    seen = losses(t)
    assert np.mean(seen[-5:]) < 0.85 * np.mean(seen[:5]), seen
    m, (x, y) = t.model, next(iter(data()))
    x, y = x.to(DEV), y.to(DEV)
    with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        fused, plain = fused_lm_loss(m.hidden_states(x), m.head.weight, y), lm_loss(m(x), y)
    assert abs(fused.item() - plain.item()) < (2e-2 if precision == "bf16" else 1e-4) * plain.item()


@needs_device
def test_fused_loss_fp16_on_the_device():
    if DEV != "cuda": pytest.skip("fp16 matrix products are a GPU's")
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(64, 32, generator=g) * 1.5, torch.randn(300, 32, generator=g) * 1.5
    y = torch.randint(0, 300, (64,), generator=g)
    ref = lm_loss((h @ W.T)[None], y[None])
    hf, Wf = h.to(DEV).half().requires_grad_(), W.to(DEV).half().requires_grad_()
    loss = fused_lm_loss(hf, Wf, y.to(DEV)); loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item() and torch.isfinite(Wf.grad).all()


@needs_device
def test_compile_trains_like_eager():
    runs = [Trainer(model(), data(), cfg=dict(FAST, precision="fp32", max_steps=6, compile=c), default_cbs=False) for c in (False, True)]
    eager, compiled = (losses(t) for t in runs)
    np.testing.assert_allclose(compiled, eager, rtol=1e-3, atol=1e-4)


@cuda_only
def test_pinned_batches_reach_the_gpu_unchanged():
    ds = NextTokenPredictionDataset(np.arange(2000) % 97, max_length=32)
    pinned = create_dataloader(ds, batch_size=8, seed=0)  # pin_memory=None: pinned when CUDA is available
    plain = create_dataloader(ds, batch_size=8, seed=0, pin_memory=False)
    (xp, yp), (x, y) = next(iter(pinned)), next(iter(plain))
    assert xp.is_pinned() and not x.is_pinned()
    assert torch.equal(xp.to("cuda", non_blocking=True).cpu(), x) and torch.equal(yp.to("cuda", non_blocking=True).cpu(), y)
