"Model-side checks (llm_playground.attention, llm_playground.transformer) beyond the quick ones in nbs/04 and nbs/05."
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llm_playground.attention import KVCache, MultiHeadAttention, causal_mask, kv_cache_bytes, make_attn_mask
from llm_playground.config import ConfigError, compose_config, config_dir
from llm_playground.transformer import PRESETS, ModelConfig, Transformer, model_config, model_preset, preset_names

SMALL = dict(vocab_size=97, context_length=48, emb_dim=48, n_layers=3, n_heads=6)


def _ref_attention(x, m: MultiHeadAttention):
    "Per-head loop reference on the module's own weights (causal, no dropout)."
    B, T, C = x.shape
    d = C // m.n_heads
    q_all, k_all, v_all = F.linear(x, m.qkv.weight, m.qkv.bias).split(C, dim=-1)
    outs = []
    for h in range(m.n_heads):
        s = slice(h * d, (h + 1) * d)
        scores = q_all[..., s] @ k_all[..., s].transpose(-2, -1) / math.sqrt(d)
        scores = scores.masked_fill(~causal_mask(T, device=x.device), float("-inf"))
        outs.append(scores.softmax(-1) @ v_all[..., s])
    return F.linear(torch.cat(outs, -1), m.proj.weight, m.proj.bias)


def _out_and_grads(f, x, params):
    x = x.detach().requires_grad_()
    y = f(x)
    g = torch.autograd.grad((y * torch.randn_like(y, generator=torch.Generator().manual_seed(0))).sum(), [x, *params])
    return y.detach(), g


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("return_attn", [False, True])
def test_mha_fused(bias, return_attn):
    "Fused SDPA module == per-head reference: forward and gradients (input and all parameters), dropout off."
    torch.manual_seed(0)
    m = MultiHeadAttention(48, 6, bias=bias).eval()
    x = torch.randn(3, 11, 48)
    params = list(m.parameters())
    y0, g0 = _out_and_grads(lambda t: _ref_attention(t, m), x, params)
    y1, g1 = _out_and_grads(lambda t: m(t, return_attn=True)[0] if return_attn else m(t), x, params)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-4)
    for a, b in zip(g1, g0): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_causal_mask_offset():
    m = causal_mask(3, 7)
    assert m.shape == (3, 7)
    assert m.sum(-1).tolist() == [5, 6, 7]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(SMALL).eval()


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[20], [1] * 20, [7, 1, 1, 5, 6], [3, 17]])
def test_cached_equals_full(model, chunks):
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = model.new_kv_cache(2)
    ptr_k, ptr_v = cache.k.data_ptr(), cache.v.data_ptr()
    outs, t = [], 0
    for n in chunks:
        outs.append(model(ids[:, t:t + n], kv_cache=cache)); t += n
        assert cache.length == t
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == (ptr_k, ptr_v)   # preallocated, written in place
    assert cache.max_length == SMALL["context_length"]


@torch.no_grad()
def test_left_padding_matches_single_sequences(model):
    "Real-token logits of a left-padded batch == each prompt alone, in a full pass and through prefill + decode."
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=g) for n in (3, 9, 6)]
    T = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(p, (T - len(p), 0), value=0) for p in prompts])
    am = torch.stack([F.pad(torch.ones(len(p), dtype=torch.long), (T - len(p), 0)) for p in prompts])
    pos = am.cumsum(-1) - 1
    out = model(ids, attention_mask=am, position_ids=pos)
    assert torch.isfinite(out).all()
    for i, p in enumerate(prompts):
        torch.testing.assert_close(out[i, T - len(p):], model(p[None])[0], atol=1e-5, rtol=1e-4)
    # prefill the padded batch, then decode 4 tokens one at a time (as generation does)
    cache = model.new_kv_cache(3)
    last = model(ids, attention_mask=am, position_ids=pos, kv_cache=cache)[:, -1]
    seqs = [p.clone() for p in prompts]
    for _ in range(4):
        nxt = last.argmax(-1, keepdim=True)
        seqs = [torch.cat([s, n]) for s, n in zip(seqs, nxt)]
        am = torch.cat([am, torch.ones(3, 1, dtype=am.dtype)], 1)
        pos = pos[:, -1:] + 1
        last = model(nxt, attention_mask=am, position_ids=pos, kv_cache=cache)[:, -1]
        for i, s in enumerate(seqs):
            torch.testing.assert_close(last[i], model(s[None])[0, -1], atol=1e-5, rtol=1e-4)
    assert cache.length == T + 4


@torch.no_grad()
def test_padding_gets_no_attention_and_no_nan(model):
    am = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    ids = torch.randint(0, 97, (3, 5))
    logits, ws = model(ids, attention_mask=am, position_ids=am.cumsum(-1) - 1, return_attn=True)
    assert torch.isfinite(logits).all() and len(ws) == SMALL["n_layers"]
    for w in ws:
        assert torch.isfinite(w).all()
        real_q = am.bool()[:, None, :, None]          # [B, 1, T, 1]
        pad_k = ~am.bool()[:, None, None, :]          # [B, 1, 1, S]
        assert (w * real_q * pad_k).abs().max() == 0
    # an all-padding mask (never produced by left padding) still gives finite outputs
    assert torch.isfinite(model(ids, attention_mask=torch.zeros(3, 5))).all()


def test_padding_gradients_finite():
    torch.manual_seed(0)
    m = Transformer(SMALL, drop_attn=0.1, drop_resid=0.1, drop_emb=0.1).train()
    ids = torch.randint(0, 97, (2, 8))
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    logits = m(ids, attention_mask=am, position_ids=am.cumsum(-1) - 1)
    F.cross_entropy(logits[am.bool()], ids[am.bool()]).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@torch.no_grad()
def test_context_and_cache_errors(model):
    ctx = SMALL["context_length"]
    with pytest.raises(ValueError, match=f"0 cached \\+ {ctx + 1} new = {ctx + 1} positions exceeds context_length {ctx}"):
        model(torch.zeros(1, ctx + 1, dtype=torch.long))
    cache = model.new_kv_cache(1)
    model(torch.zeros(1, ctx - 2, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match=f"{ctx - 2} cached \\+ 3 new = {ctx + 1} positions exceeds context_length {ctx}"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    assert cache.length == ctx - 2
    small = model.new_kv_cache(1, max_length=4)
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=small)
    with pytest.raises(ValueError, match="4 cached \\+ 1 new = 5 positions exceeds its max_length 4"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=small)
    small.reset()
    assert small.length == 0
    model(torch.zeros(1, 1, dtype=torch.long), kv_cache=small)
    assert small.length == 1


@torch.no_grad()
def test_kv_cache_reorder_and_crop(model):
    ids = torch.randint(0, 97, (2, 10))
    full = model(ids)
    cache = model.new_kv_cache(2)
    model(ids[:, :6], kv_cache=cache)
    cache.reorder(torch.tensor([1, 1]))
    out = model(ids[[1, 1], 6:8], kv_cache=cache)
    torch.testing.assert_close(out, full[[1, 1], 6:8], atol=1e-5, rtol=1e-4)
    cache.crop(3)
    torch.testing.assert_close(model(ids[[1, 1], 3:5], kv_cache=cache), full[[1, 1], 3:5], atol=1e-5, rtol=1e-4)


def test_bf16_autocast_and_cast():
    torch.manual_seed(0)
    m = Transformer(SMALL)
    ids = torch.randint(0, 97, (2, 12))
    ref = m(ids).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids)
        F.cross_entropy(out.flatten(0, 1).float(), ids.flatten()).backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    assert m.new_kv_cache(1).k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.new_kv_cache(1).k.dtype == torch.bfloat16     # made under autocast: stores what attention computes in
    mb = Transformer(SMALL).to(torch.bfloat16)
    mb.load_state_dict(m.state_dict())
    mb.eval()
    with torch.no_grad():
        cache = mb.new_kv_cache(2)
        assert cache.k.dtype == torch.bfloat16
        a = torch.cat([mb(ids[:, :5], kv_cache=cache), mb(ids[:, 5:], kv_cache=cache)], 1)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), ref, atol=0.05, rtol=0.05)


def test_init():
    torch.manual_seed(0)
    m = Transformer(vocab_size=1000, context_length=64, emb_dim=256, n_layers=8, n_heads=4)
    assert m.head.weight is m.tok_emb.weight
    assert abs(m.blocks[3].attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(m.blocks[3].attn.proj.weight.std().item() - 0.02 / 4) < 5e-4    # 1/sqrt(2 * 8)
    assert abs(m.blocks[3].mlp.proj.weight.std().item() - 0.02 / 4) < 5e-4
    assert m.blocks[0].attn.qkv.bias.abs().max() == 0
    assert Transformer(SMALL, bias=False).blocks[0].attn.qkv.bias is None
    assert Transformer(SMALL, tie_weights=False).head.weight is not Transformer(SMALL).tok_emb.weight


def test_presets_yaml_and_param_counts():
    "Every YAML file of the model group is a preset that builds; the files state only what differs from the defaults."
    files = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))
    assert sorted(PRESETS) == sorted(preset_names()) == files
    defaults = dataclasses.asdict(ModelConfig())
    for name in files:
        diff = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{name}.yaml"))
        assert diff.pop("defaults") == ["model_schema"], name                   # Hydra starts from ModelConfig
        assert all(defaults[k] != v for k, v in diff.items()), (name, diff)     # nothing restated
        assert model_preset(name) == PRESETS[name] == {**defaults, **diff}, name
        with torch.device("meta"):
            assert Transformer.from_preset(name).cfg == model_config(diff), name
    assert set(OmegaConf.load(config_dir() / "model" / "gpt2_124m.yaml")) == {"defaults"}   # the defaults are GPT-2 124M
    expected = {"tiny": 16_090_880, "gpt2_124m": 124_439_808, "gpt2_355m": 354_823_168, "gpt2_774m": 774_030_080,
                "gpt2_1558m": 1_557_611_200}
    with torch.device("meta"):
        for name, n in expected.items():
            m = Transformer.from_preset(name)
            assert m.num_params() == n, name
            assert m.cfg.head_dim == 64
    with torch.device("meta"):
        assert Transformer.from_preset("gpt2_124m", context_length=256).cfg.context_length == 256
    assert list(PRESETS) == ["tiny", "gpt2_124m", "gpt2_355m", "gpt2_774m", "gpt2_1558m"]   # smallest first
    with pytest.raises(KeyError): PRESETS["gpt5"]
    with pytest.raises(ConfigError, match="Unknown model preset 'gpt5'. Presets: tiny, gpt2_124m"): model_preset("gpt5")


@pytest.mark.parametrize("name", ["tiny", "gpt2_124m", "gpt2_355m", "gpt2_774m", "gpt2_1558m"])
def test_hydra_composes_each_preset_from_the_defaults(name):
    "`model=<name>` composes to exactly `model_preset(name)`, although lp_pretrain's own default model is tiny."
    cfg = compose_config("pretrain", [f"model={name}"])
    assert model_config(cfg.model) == ModelConfig(**model_preset(name))
    with_override = compose_config("pretrain", [f"model={name}", "model.drop_attn=0.1"])
    assert model_config(with_override.model) == ModelConfig(**{**model_preset(name), "drop_attn": 0.1})


def test_forward_contract():
    "forward takes what a model needs, nothing for the speed of generation; forward = head(hidden_states)."
    import inspect
    kw = [n for n, p in inspect.signature(Transformer.forward).parameters.items() if p.kind == p.KEYWORD_ONLY]
    assert kw == ["attention_mask", "position_ids", "kv_cache", "return_attn", "last_only"]
    torch.manual_seed(0)
    m = Transformer(SMALL).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m.head(m.hidden_states(ids)), m(ids))
        torch.testing.assert_close(m.head(m.hidden_states(ids, last_only=True)), m(ids, last_only=True))
        assert m(ids, last_only=True).shape == (2, 1, 97)


def test_presets_are_read_lazily():
    "Importing the model module reads no preset file (they are read when a preset is asked for)."
    import subprocess, sys
    code = ("import pathlib; from omegaconf import OmegaConf; orig = OmegaConf.load; seen = []; "
            "OmegaConf.load = lambda f, *a, **k: (seen.append(str(f)), orig(f, *a, **k))[1]; "
            "import llm_playground.transformer as t; assert not seen, seen; t.PRESETS['tiny']; assert seen; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_model_group_composes_with_hydra():
    "The packaged `model` group is found by Hydra (as a trainer config's `defaults: [model: tiny]` would)."
    cfg = compose_config("pretrain", ["model=gpt2_355m", "model.context_length=512"])
    m = model_config(cfg.model)
    assert (m.n_layers, m.emb_dim, m.n_heads, m.context_length) == (24, 1024, 16, 512)


def test_config_validation():
    assert isinstance(model_config(), ModelConfig)
    with pytest.raises(ConfigError, match="Did you mean: emb_dim"): Transformer(emb_dimm=64)
    with pytest.raises(ConfigError, match="divisible"): Transformer(emb_dim=50, n_heads=4)
    with pytest.raises(ConfigError, match="model.n_layers must be a positive integer"): model_config(n_layers=0)
    with pytest.raises(ConfigError, match="Unknown model preset"): Transformer.from_preset("gpt5")
    assert Transformer({"vocab_size": 11, "context_length": 8, "emb_dim": 8, "n_layers": 1, "n_heads": 2}).cfg.vocab_size == 11


def test_flops_and_summary():
    with torch.device("meta"):
        m = Transformer.from_preset("gpt2_124m")
    # nanoGPT: N = params minus position embeddings (the tied token table is the head)
    assert m.flops_per_token() == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 12 * 64 * 1024
    assert m.flops_per_token(seq_len=512, training=False) == (6 * (124_439_808 - 1024 * 768) + 12 * 12 * 12 * 64 * 512) // 3
    s = m.summary()
    assert "blocks (x12)" in s and "124,439,808" in s


def test_kv_cache_bytes():
    assert kv_cache_bytes(1, 12, 64) == 2 * 12 * 64 * 2
    with torch.device("meta"):
        m = Transformer.from_preset("gpt2_355m")
        c = m.new_kv_cache(3, max_length=100, dtype=torch.bfloat16)
    assert c.nbytes == kv_cache_bytes(24, 16, 64, n_tokens=100, batch_size=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cached_and_padded():
    torch.manual_seed(0)
    m = Transformer(SMALL).cuda().eval()
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    am = torch.ones(2, 16, device="cuda", dtype=torch.long); am[0, :5] = 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = m(ids, attention_mask=am, position_ids=am.cumsum(-1) - 1)
        cache = m.new_kv_cache(2)
        a = m(ids[:, :10], attention_mask=am[:, :10], position_ids=am[:, :10].cumsum(-1) - 1, kv_cache=cache)
        b = m(ids[:, 10:], attention_mask=am, position_ids=am.cumsum(-1)[:, 10:] - 1, kv_cache=cache)
    torch.testing.assert_close(torch.cat([a, b], 1)[am.bool()].float(), full[am.bool()].float(), atol=0.05, rtol=0.05)
