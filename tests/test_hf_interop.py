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


# --- from_hf: every kind of source, the heads from the config wherever there is one ---------------------------------
import json, os, shutil, subprocess, sys  # noqa: E402
from pathlib import Path  # noqa: E402

from llm_playground.transformer import HFError  # noqa: E402

C16 = 64  # 4 heads of width 16: a shape the old emb_dim // 64 guess got wrong (one head of 64)


def _hf16(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, n_positions=CTX, n_embd=C16, n_layer=2, n_head=4, bos_token_id=V - 1, eos_token_id=V - 1) | kw
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def _close(a, b): torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_from_instance_takes_heads_from_its_config():
    hf = _hf16()
    ours = Transformer.from_hf(hf).eval()
    assert (ours.cfg.n_heads, ours.cfg.emb_dim, ours.cfg.drop_resid) == (4, C16, 0.1)   # GPT-2's dropout, from the config
    ids = torch.randint(0, V, (2, 17))
    _close(ours(ids), hf(ids).logits)
    trunk = Transformer.from_hf(hf.transformer).eval()   # a GPT2Model (no head: tied to wte)
    _close(trunk.hidden_states(ids), hf.transformer(ids).last_hidden_state)
    with pytest.raises(HFError, match="config says n_head=4"): Transformer.from_hf(hf, n_heads=1)


@torch.no_grad()
def test_from_save_pretrained_folder_single_and_sharded(tmp_path):
    hf, ids = _hf16(seed=1), torch.randint(0, V, (2, 11))
    hf.save_pretrained(tmp_path/"one")
    hf.save_pretrained(tmp_path/"sharded", max_shard_size="20KB")
    assert (tmp_path/"sharded"/"model.safetensors.index.json").is_file()
    for d in ("one", "sharded"):
        ours = Transformer.from_hf(tmp_path/d).eval()
        assert ours.cfg.n_heads == 4
        _close(ours(ids), hf(ids).logits)
    _close(Transformer.from_hf(str(tmp_path/"one"/"config.json")).eval()(ids), hf(ids).logits)   # naming its config.json


@torch.no_grad()
def test_bare_state_dict_needs_n_heads(tmp_path):
    "No config: n_heads is required, never guessed; the old guess (emb_dim // 64 = 1 head) gives other logits."
    from safetensors.torch import save_file
    hf, ids = _hf16(seed=2), torch.randint(0, V, (2, 13))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path/"weights.safetensors"))
    for src in (hf.state_dict(), tmp_path/"weights.safetensors"):
        with pytest.raises(HFError, match=r"pass n_heads=\.\.\."): Transformer.from_hf(src)
        _close(Transformer.from_hf(src, n_heads=4).eval()(ids), hf(ids).logits)
    guessed = Transformer.from_hf(sd, n_heads=1).eval()(ids)
    assert (guessed - hf(ids).logits).abs().max() > 1e-3


@torch.no_grad()
def test_unsupported_options_are_refused(tmp_path):
    ids = torch.randint(0, V, (1, 9))
    for kw, says in [(dict(activation_function="gelu"), "activation_function='gelu'"),
                     (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=true"),
                     (dict(scale_attn_weights=False), "scale_attn_weights=false"),
                     (dict(n_inner=100), "n_inner=100, not a multiple of n_embd=64")]:
        hf = _hf16(**kw)
        with pytest.raises(HFError, match=says): Transformer.from_hf(hf)
        hf.save_pretrained(tmp_path/"x", safe_serialization=True)
        with pytest.raises(HFError, match=says): Transformer.from_hf(tmp_path/"x")
        shutil.rmtree(tmp_path/"x")
    hf = _hf16(n_inner=2 * C16)   # a narrower MLP we build exactly
    ours = Transformer.from_hf(hf).eval()
    assert ours.cfg.mlp_ratio == 2
    _close(ours(ids), hf(ids).logits)
    with pytest.raises(HFError, match="GPT2LMHeadModel or GPT2Model"):
        Transformer.from_hf(transformers.GPT2ForSequenceClassification(hf.config))


def _cmd(name):
    exe = shutil.which(f"lp_{name}")
    return [exe] if exe else [sys.executable, "-m", "llm_playground.cli", name]


def _run(*args, cwd=None, **env):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1", **env))


def test_hub_name_offline_is_one_clear_line(tmp_path):
    "A hub name goes through transformers' from_pretrained; offline with an empty cache: one line saying so, and what to pass instead."
    (tmp_path/"hf_home").mkdir()
    r = _run(*_cmd("sample"), "checkpoint=hf:gpt2", "prompt=Hi", "device=cpu", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path/"hf_home"),
             HF_HUB_CACHE=str(tmp_path/"hf_home"/"hub"), TRANSFORMERS_OFFLINE="1", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("lp_sample: error: Cannot load 'gpt2' from the Hugging Face hub: it is not in the local cache"), r.stderr
    assert "save_pretrained folder" in lines[-1] and "hf:path/to/folder" in lines[-1] and "Traceback" not in r.stderr


# --- export: our models as save_pretrained folders transformers loads ------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(bias=False), dict(tie_weights=False, mlp_ratio=2, ln_eps=1e-6)])
@torch.no_grad()
def test_save_hf_loads_in_transformers(tmp_path, kw):
    from llm_playground.hf import save_hf
    torch.manual_seed(5)
    ours = Transformer(vocab_size=V, context_length=CTX, emb_dim=C16, n_layers=2, n_heads=4, **kw).eval()
    for p in ours.parameters(): p.add_(torch.randn_like(p) * 0.05)   # LayerNorms and biases away from 1 and 0 too
    save_hf(ours, tmp_path/"out")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path/"out").eval()
    ids = torch.randint(0, V, (2, 19))
    _close(hf(ids).logits, ours(ids))
    assert hf.config.n_head == 4 and hf.config.tie_word_embeddings == ours.cfg.tie_weights
    back = Transformer.from_hf(tmp_path/"out").eval()
    _close(back(ids), ours(ids))


def test_exported_tokenizers_load_in_transformers(tmp_path):
    "GPT-2's BPE as vocab.json + merges.txt, a trained BPE as tokenizer.json: AutoTokenizer encodes every text as we do."
    from transformers import AutoTokenizer
    from llm_playground.hf import save_hf
    from llm_playground.tokenizer import BPETokenizer, GPT2Tokenizer
    text = (Path(__file__).resolve().parents[1]/"data"/"fixtures"/"pride_and_prejudice_ch1.txt").read_text()
    sample = text[:1500] + " Ünïcode — 2026 <|endoftext|> tabs\t and  spaces  "
    for tok, name in [(GPT2Tokenizer(), "gpt2"), (BPETokenizer.train([text], 320), "bpe")]:
        model = Transformer(vocab_size=tok.vocab_size, context_length=CTX, emb_dim=16, n_layers=1, n_heads=2)
        save_hf(model, tmp_path/name, tok)
        theirs = AutoTokenizer.from_pretrained(tmp_path/name)
        assert theirs(sample)["input_ids"] == tok.encode(sample), name
        assert theirs.decode(tok.encode(sample)) == sample and theirs.eos_token_id == tok.eot_token


# --- the command line: lp_export, lp_sample checkpoint=hf:, lp_pretrain init_from=hf: -------------------------------
FIXTURE = Path(__file__).resolve().parents[1]/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    r = _run(*_cmd("pretrain"), "experiment=smoke", f"dataset.train={FIXTURE}", f"trainer.output_dir={d}", "trainer.max_steps=3",
             "trainer.device=cpu", "trainer.sampling.prompts=[]", cwd=d)
    assert r.returncode == 0, r.stderr
    return next(d.glob("smoke/*"))


@torch.no_grad()
def test_lp_export(smoke_run, tmp_path):
    from llm_playground.cli import load_model
    out = tmp_path/"exported"
    r = _run(*_cmd("export"), f"checkpoint={smoke_run}", f"out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "lp_export: warning: The char tokenizer has no transformers equivalent" in r.stderr   # characters: the model alone
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    ours, tok, _ = load_model(smoke_run, device="cpu")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode("It is a truth")])   # within the 16-token context
    _close(hf(ids).logits, ours(ids))
    r = _run(*_cmd("export"), f"checkpoint={smoke_run}", f"out={out}", cwd=tmp_path)
    assert r.returncode == 1 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(HFError, match="no tokenizer.json"): load_model(f"hf:{out}")   # lp_sample checkpoint=hf:<it>: no tokenizer to use


@torch.no_grad()
def test_lp_sample_hf_folder_matches_transformers_greedy(tmp_path):
    "lp_sample checkpoint=hf:<save_pretrained folder>: GPT-2's tokenizer, and the greedy text transformers' own generate gives."
    from llm_playground.tokenizer import GPT2Tokenizer
    torch.manual_seed(7)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()   # GPT-2's vocabulary, tiny otherwise
    hf.save_pretrained(tmp_path/"tiny_gpt2")
    tok = GPT2Tokenizer()
    ids = torch.tensor([tok.encode("The meaning of")])
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eot_token, eos_token_id=None)[0, ids.shape[1]:].tolist()
    r = _run(*_cmd("sample"), f"checkpoint=hf:{tmp_path/'tiny_gpt2'}", "prompt=The meaning of", "max_new_tokens=8", "temperature=0",
             "stream=false", "device=cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The meaning of" + tok.decode(ref[:ref.index(tok.eot_token)] if tok.eot_token in ref else ref) + "\n"


@torch.no_grad()
def test_lp_pretrain_init_from_hf(tmp_path):
    "init_from=hf:<folder>: the run starts from those weights (lr ~ 0: it stays there), records their shape, and needs no HF afterwards."
    from llm_playground.cli import load_model, prepare_run
    from llm_playground.config import ConfigError, compose_config
    torch.manual_seed(8)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()   # experiment=smoke's shape
    hf.save_pretrained(tmp_path/"start")
    common = ["experiment=smoke", f"dataset.train={FIXTURE}", "trainer.device=cpu", "trainer.sampling.prompts=[]", "trainer.max_steps=2"]
    bad = [*common, f"init_from=hf:{tmp_path/'start'}", "model.n_layers=3", f"trainer.output_dir={tmp_path/'bad'}"]
    with pytest.raises(ConfigError, match=r"model.n_layers=3 \(the checkpoint's is 2\)"): prepare_run(compose_config("pretrain", bad), bad)
    assert not (tmp_path/"bad").exists()   # refused before anything was written
    r = _run(*_cmd("pretrain"), *common, f"init_from=hf:{tmp_path/'start'}", "optimiser.lr=1e-9", "optimiser.warmup_steps=0",
             "model.drop_resid=0.1", f"trainer.output_dir={tmp_path/'models'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = next((tmp_path/"models").glob("smoke/*"))
    shutil.rmtree(tmp_path/"start")   # from now on, no Hugging Face folder
    ours, _, cfg = load_model(run_dir, device="cpu")
    assert cfg.init_from == f"hf:{tmp_path/'start'}" and (cfg.model.n_heads, cfg.model.drop_resid) == (2, 0.1)
    ids = torch.randint(0, 101, (2, 16))
    _close(ours(ids), hf(ids).logits)   # trained at lr 1e-9: still the Hugging Face weights
    ov = [f"resume={run_dir}", "trainer.max_steps=3", "trainer.device=cpu"]
    trainer = prepare_run(compose_config("pretrain", ov), ov)   # resumes from its own checkpoint: the Hugging Face folder is gone
    try: assert trainer.step == 2 and trainer.model.cfg == ours.cfg
    finally: trainer.run_lock.release()
    ov = [f"resume={run_dir}", "init_from=hf:gpt2"]
    with pytest.raises(ConfigError, match="give one of them"): prepare_run(compose_config("pretrain", ov), ov)


def test_init_from_refuses_data_of_another_tokenizer(tmp_path):
    "A GPT-2-vocabulary model with no tokenizer.json reads GPT-2 ids: a run on character ids is refused before anything is written."
    from llm_playground.cli import prepare_run
    from llm_playground.config import ConfigError, compose_config
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tmp_path/"g")
    ov = ["tokenizer=char", f"dataset.train={FIXTURE}", "dataset.validation=null", "dataset.max_length=16", "trainer.device=cpu",
          f"init_from=hf:{tmp_path/'g'}", f"trainer.output_dir={tmp_path/'models'}"]
    with pytest.raises(ConfigError, match="was trained with the gpt2 tokenizer, but this run's data were tokenized with char"):
        prepare_run(compose_config("pretrain", ov), ov)
    assert not (tmp_path/"models").exists()


def test_without_transformers_one_line_says_how_to_install(monkeypatch, tmp_path):
    "transformers is an optional extra: only a hub name needs it, and without it the error says how to install it."
    monkeypatch.setitem(sys.modules, "transformers", None)   # `import transformers` now fails, as where it is not installed
    with pytest.raises(HFError, match=r'pip install "llm-playground\[hf\]"'): Transformer.from_hf("gpt2")
    from llm_playground.hf import save_hf
    save_hf(Transformer(vocab_size=V, context_length=CTX, emb_dim=16, n_layers=1, n_heads=2), tmp_path/"m")
    assert Transformer.from_hf(tmp_path/"m").cfg.n_heads == 2   # folders need no transformers
