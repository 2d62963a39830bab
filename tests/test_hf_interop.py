"Our Transformer against Hugging Face `transformers`' GPT2LMHeadModel (random weights, no download)."
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from llm_playground.transformer import Transformer  # noqa: E402

V, CTX, C, L, H = 101, 40, 48, 3, 4


def _hf(tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=CTX, n_embd=C, n_layer=L, n_head=H, bos_token_id=V - 1,
                     eos_token_id=V - 1, tie_word_embeddings=tie)
    m = GPT2LMHeadModel(cfg).eval()
    if not tie:  # make sure the head really differs from the embedding
        with torch.no_grad(): m.lm_head.weight.normal_(0, 0.02)
    return m


@pytest.fixture(scope="module")
def pair():
    hf = _hf()
    return hf, Transformer.from_hf(hf.state_dict(), n_heads=H).eval()


@torch.no_grad()
def test_logits_match(pair):
    hf, ours = pair
    ids = torch.randint(0, V, (3, 25))
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_logits_match_left_padded(pair):
    hf, ours = pair
    ids = torch.randint(0, V, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long); am[0, :4] = 0
    pos = am.cumsum(-1) - 1
    ref = hf(ids, attention_mask=am, position_ids=pos.clamp(min=0)).logits
    out = ours(ids, attention_mask=am, position_ids=pos)
    torch.testing.assert_close(out[am.bool()], ref[am.bool()], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_cached_decode_matches_hf_full_pass(pair):
    hf, ours = pair
    ids = torch.randint(0, V, (2, 20))
    ref = hf(ids).logits
    cache = ours.new_kv_cache(2)
    out = [ours(ids[:, :8], kv_cache=cache)] + [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(out, 1), ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_untied():
    hf = _hf(tie=False)
    ours = Transformer.from_hf(hf.state_dict(), n_heads=H).eval()
    assert not ours.cfg.tie_weights
    ids = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="tie_weights=False"):
        Transformer(ours.cfg, tie_weights=True).load_hf_state_dict(hf.state_dict())


@torch.no_grad()
def test_export_to_hf():
    "Our (random) weights, exported with to_hf_state_dict, load strictly into GPT2LMHeadModel and give our logits."
    torch.manual_seed(3)
    ours = Transformer(vocab_size=V, context_length=CTX, emb_dim=C, n_layers=L, n_heads=H).eval()
    hf = _hf(seed=9)
    res = hf.load_state_dict(ours.to_hf_state_dict(), strict=False)
    assert not res.unexpected_keys
    assert all(k.endswith(("attn.bias", "attn.masked_bias")) for k in res.missing_keys)
    ids = torch.randint(0, V, (2, 15))
    torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_safetensors_file(tmp_path, pair):
    from safetensors.torch import save_file
    hf, ours = pair
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))   # hub layout: no prefix, no lm_head
    loaded = Transformer.from_hf(tmp_path / "model.safetensors", n_heads=H).eval()
    ids = torch.randint(0, V, (1, 9))
    torch.testing.assert_close(loaded(ids), ours(ids))


def test_mismatch_error_lists_everything(pair):
    hf, _ = pair
    sd = dict(hf.state_dict())
    sd.pop("transformer.h.1.mlp.c_fc.bias")
    sd["transformer.h.0.attn.c_attn.weight"] = torch.zeros(C, 2 * C)
    sd["extra.weight"] = torch.zeros(2, 2)
    m = Transformer(vocab_size=V, context_length=CTX, emb_dim=C, n_layers=L, n_heads=H)
    with pytest.raises(ValueError) as e: m.load_hf_state_dict(sd)
    msg = str(e.value)
    assert "missing keys (1):\n    h.1.mlp.c_fc.bias [192]" in msg
    assert "unexpected keys (1):\n    extra.weight [2, 2]" in msg
    assert "h.0.attn.c_attn.weight: checkpoint [48, 96], model [48, 144]" in msg


@torch.no_grad()
def test_chapter_model_matches_transformers():
    "The cross-check of chapter 05 (moved here: importing transformers is slow): its 2-layer model and padded batch."
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                    bos_token_id=99, eos_token_id=99)).eval()
    ours = Transformer.from_hf(hf.state_dict(), n_heads=4).eval()
    ids = torch.randint(0, 100, (2, 10))
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    short, long = torch.randint(0, 100, (5,)), torch.randint(0, 100, (8,))
    batch = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    am = torch.tensor([[0] * 3 + [1] * 5, [1] * 8])
    pos = am.cumsum(-1) - 1
    hf_pad = hf(batch, attention_mask=am, position_ids=pos.clamp(min=0)).logits   # HF does not clamp
    ours_pad = ours(batch, attention_mask=am, position_ids=pos)
    torch.testing.assert_close(ours_pad[am.bool()], hf_pad[am.bool()], atol=1e-4, rtol=1e-4)
