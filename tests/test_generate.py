"Tests of llm_playground.inference_utils (Transformer.generate and friends) too heavy or too broad for notebook 06b."
import random
import subprocess
import sys
import warnings

import pytest
import torch

from llm_playground.inference_utils import (generate_text, greedy_decode, pad_prompts, position_ids_from_mask,
                                            sample_next_token)
from llm_playground.logit_processors import PAD_ID, SuppressTokensProcessor, processors_from_config
from llm_playground.tokenizer import CharTokenizer, GPT2Tokenizer
from llm_playground.transformer import Transformer

V, CTX = 97, 48


def tiny(seed=0, **kw) -> Transformer:
    "A tiny random fp32 model; untied head and larger init so greedy decoding does not just repeat a token."
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, context_length=CTX, emb_dim=32, n_layers=2, n_heads=4, tie_weights=False, init_std=0.1)
    return Transformer(cfg | kw).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model(): return tiny()


def random_prompts(n, lo=1, hi=20, seed=0, vocab=V):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def quiet(f, *args, **kwargs):
    "Call `f` with the sliding-window warning silenced."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return f(*args, **kwargs)


class Recorder:
    "Wrap `model.hidden_states` (the trunk the decode loop runs) to record the shape of every call and whether it used a cache."
    def __init__(self, model):
        self.model, self.calls, self.caches = model, [], []
        self.orig_hidden, self.orig_new = model.hidden_states, model.new_kv_cache
        def hidden_states(input_ids, **kw):
            self.calls.append((tuple(input_ids.shape), kw.get("kv_cache") is not None))
            return self.orig_hidden(input_ids, **kw)
        def new_kv_cache(*a, **kw):
            c = self.orig_new(*a, **kw); self.caches.append(c); return c
        model.hidden_states, model.new_kv_cache = hidden_states, new_kv_cache
    def __enter__(self): return self
    def __exit__(self, *exc): del self.model.hidden_states, self.model.new_kv_cache


# ---------------------------------------------------------------- exactness: cache, batching

@pytest.mark.parametrize("rep", [None, 1.3])
def test_cache_equals_no_cache_unequal_batch(model, rep):
    prompts = random_prompts(7, 1, 20, seed=1)
    with_cache = model.generate(prompts, 25, temperature=0, repetition_penalty=rep)
    without = model.generate(prompts, 25, temperature=0, repetition_penalty=rep, use_cache=False)
    assert with_cache == without
    assert all(len(o) == 25 for o in with_cache)
    assert len({tuple(o) for o in with_cache}) > 1   # not a degenerate model


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_equals_one_by_one(model, use_cache):
    prompts = random_prompts(6, 1, 15, seed=2)
    batched = model.generate(prompts, 20, temperature=0, repetition_penalty=1.2, use_cache=use_cache)
    alone = [model.generate(p, 20, temperature=0, repetition_penalty=1.2, use_cache=use_cache)[0] for p in prompts]
    assert batched == alone
    # the same with an EOS token that some sequences hit
    ref = model.generate(prompts, 20, temperature=0, use_cache=use_cache)
    eos = ref[0][5]
    b = model.generate(prompts, 20, temperature=0, eos_token_id=eos, use_cache=use_cache)
    a = [model.generate(p, 20, temperature=0, eos_token_id=eos, use_cache=use_cache)[0] for p in prompts]
    assert b == a and b[0] == ref[0][:ref[0].index(eos) + 1]
    assert b == [r[:r.index(eos) + 1] if eos in r else r for r in ref]


def test_batch_order_does_not_matter(model):
    prompts = random_prompts(5, 1, 12, seed=3)
    out = model.generate(prompts, 15, temperature=0)
    rev = model.generate(prompts[::-1], 15, temperature=0)
    assert out == rev[::-1]


def test_generate_matches_greedy_decode(model):
    prompt = torch.tensor([random_prompts(1, 10, 10, seed=4)[0]] * 2)
    ref = greedy_decode(model, prompt, 30, use_cache=False)
    assert greedy_decode(model, prompt, 30).tolist() == ref.tolist()
    assert model.generate(prompt, 30, temperature=0) == ref[:, 10:].tolist()


def test_padded_forward_matches_unpadded(model):
    prompts = random_prompts(4, 1, 10, seed=5)
    ids, mask = pad_prompts(prompts)
    assert (ids[mask] >= 0).all() and (ids[~mask] == PAD_ID).all()
    with torch.no_grad():
        out = model(ids.clamp(min=0), attention_mask=mask, position_ids=position_ids_from_mask(mask))
        for i, p in enumerate(prompts):
            torch.testing.assert_close(out[i, -len(p):], model(torch.tensor([p]))[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- sampling

def test_seeded_sampling_reproducible(model):
    prompts = random_prompts(4, 1, 10, seed=6)
    kw = dict(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.1)
    a = model.generate(prompts, 20, seed=123, **kw)
    assert a == model.generate(prompts, 20, seed=123, **kw)
    assert a != model.generate(prompts, 20, seed=124, **kw)
    assert a == model.generate(prompts, 20, seed=123, use_cache=False, **kw)   # the cache does not change the draws
    g = torch.Generator().manual_seed(123)
    assert model.generate(prompts, 20, generator=g, **kw) == a
    assert model.generate(prompts, 20, generator=g, **kw) != a                  # the generator moved on


def test_sampling_does_not_touch_global_rng(model):
    torch.manual_seed(0); x = torch.rand(3)
    torch.manual_seed(0); model.generate([1, 2, 3], 10, seed=5); y = torch.rand(3)
    assert torch.equal(x, y)


def test_top_k_1_is_greedy(model):
    prompts = random_prompts(3, 1, 8, seed=7)
    assert model.generate(prompts, 12, top_k=1, seed=0) == model.generate(prompts, 12, temperature=0)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next_token(logits, generator=g), minlength=4) / 20000
    torch.testing.assert_close(counts, logits[0].softmax(-1), atol=0.01, rtol=0)
    # top-k 2 at temperature 0.5: only tokens 3 and 0, in ratio exp(2/0.5)/exp(1/0.5)
    counts = torch.bincount(sample_next_token(logits, processors_from_config(0.5, 2), g), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([1, 0, 0, torch.e ** 2]) / (1 + torch.e ** 2), atol=0.01, rtol=0)


# ---------------------------------------------------------------- the decode loop's work

def test_prefill_then_one_token_steps(model):
    prompts = random_prompts(3, 2, 9, seed=8)
    L = max(map(len, prompts))
    with Recorder(model) as r:
        model.generate(prompts, 10, temperature=0)
    assert len(r.caches) == 1 and r.caches[0].max_length == L + 10 - 1    # allocated once, for exactly what is needed
    assert r.calls == [((3, L), True)] + [((3, 1), True)] * 9             # prefill, then one token per step
    with Recorder(model) as r:
        model.generate(prompts, 10, temperature=0, use_cache=False)
    assert r.calls == [((3, L + t), False) for t in range(10)] and not r.caches


def test_no_hooks_left_behind(model):
    model.generate([[1, 2], [3]], 5, temperature=0)
    s = model.generate_stream([1, 2], 5); next(s); s.close()
    with pytest.raises(ValueError): model.generate([[1, 2], []], 5)
    assert not model.ln_f._forward_hooks
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, V)


def test_overflow_falls_back_to_window(model):
    with Recorder(model) as r:
        out = quiet(model.generate, [1, 2, 3], CTX + 4, temperature=0)
    assert len(out[0]) == CTX + 4
    assert r.caches[0].max_length == CTX
    shapes = [c for c, _ in r.calls]
    assert shapes[0] == (1, 3) and all(s == (1, 1) for s in shapes[1:CTX - 2])   # cached while it fits
    assert all(s == (1, CTX) for s in shapes[CTX - 2:]) and not any(c for _, c in r.calls[CTX - 2:])


def test_early_stop_when_all_done(model):
    prompts = random_prompts(3, 3, 6, seed=9)
    ref = model.generate(prompts, 30, temperature=0)
    eos = ref[0][0]
    firsts = [o.index(eos) + 1 if eos in o else 30 for o in ref]
    with Recorder(model) as r:
        out = model.generate(prompts, 30, temperature=0, eos_token_id=eos)
    assert [len(o) for o in out] == firsts
    assert len(r.calls) == max(firsts)       # stops as soon as the last sequence is done


# ---------------------------------------------------------------- context length

@pytest.mark.parametrize("use_cache", [True, False])
def test_sliding_window_batch_invariant(model, use_cache):
    prompts = random_prompts(4, 1, CTX + 10, seed=10)   # some prompts longer than the context
    out = quiet(model.generate, prompts, CTX // 2, temperature=0, use_cache=use_cache)
    assert all(len(o) == CTX // 2 for o in out)
    assert out == [quiet(model.generate, p, CTX // 2, temperature=0, use_cache=use_cache)[0] for p in prompts]
    assert out == [quiet(model.generate, p[-CTX:], CTX // 2, temperature=0, use_cache=use_cache)[0] for p in prompts]


def test_sliding_window_cache_equals_no_cache(model):
    prompts = random_prompts(3, 1, 10, seed=11)
    a = quiet(model.generate, prompts, 2 * CTX, temperature=0)
    assert a == quiet(model.generate, prompts, 2 * CTX, temperature=0, use_cache=False)
    ref = greedy_decode(model, torch.tensor([prompts[0]]), 2 * CTX, use_cache=False)[0, len(prompts[0]):].tolist()
    assert a[0] == ref


def test_warning_only_past_context(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate([1] * 10, CTX - 9, temperature=0)     # 10 + 38 - 1 = 47 positions: fits
    with pytest.warns(UserWarning, match="sliding window"):
        model.generate([1] * 10, CTX - 8, temperature=0)


# ---------------------------------------------------------------- streaming

def test_stream_matches_generate(model):
    prompts = random_prompts(4, 1, 10, seed=12)
    ref = model.generate(prompts, 15, temperature=0)
    eos = ref[1][3]
    kw = dict(temperature=0.8, top_p=0.9, seed=3, eos_token_id=eos)
    out, steps = [[] for _ in prompts], 0
    for step in model.generate_stream(prompts, 15, **kw):
        steps += 1
        assert len(step) == len(prompts)
        for o, t in zip(out, step):
            if t is not None: o.append(t)
    assert out == model.generate(prompts, 15, **kw)
    assert steps == max(map(len, out))


def test_stream_is_lazy_and_restores_state(model):
    model.train()
    try:
        with Recorder(model) as r:
            s = model.generate_stream([1, 2], 20, temperature=0)
            assert r.calls == []                  # nothing runs before the first next()
            next(s); next(s)
            assert len(r.calls) == 2
            assert torch.is_grad_enabled() and model.training
            s.close()
    finally: model.eval()


# ---------------------------------------------------------------- inputs and errors

@pytest.mark.parametrize("prompt,kw,err,msg", [
    ([], {}, ValueError, "no prompt given"),
    ([[1], []], {}, ValueError, "prompt 1 is empty"),
    (torch.zeros(0, dtype=torch.long), {}, ValueError, "prompt 0 is empty"),
    ([1, 2.0], {}, TypeError, "must be integers"),
    (torch.tensor([1.0]), {}, TypeError, "dtype torch.float32"),
    ("hello", {}, TypeError, "tokenizer"),
    ([1, V], {}, ValueError, f"token id {V} at prompt 0, position 1 is outside"),
    ([[1], [-2]], {}, ValueError, "token id -2 at prompt 1"),
    ([1], dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    ([1], dict(temperature=-0.1), ValueError, "temperature"),
    ([1], dict(top_p=0.0), ValueError, "top_p"),
    ([1], dict(top_p=1.2), ValueError, "top_p"),
    ([1], dict(top_k=0), ValueError, "top_k"),
    ([1], dict(repetition_penalty=-1.0), ValueError, "repetition_penalty"),
    ([1], dict(eos_token_id=V), ValueError, "eos_token_id"),
    ([1], dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
])
def test_bad_inputs(model, prompt, kw, err, msg):
    kw = dict(dict(max_new_tokens=3), **kw)
    with pytest.raises(err, match=msg.replace("(", r"\(").replace("[", r"\[")):
        model.generate(prompt, **kw)
    with pytest.raises(err, match=msg.replace("(", r"\(").replace("[", r"\[")):
        model.generate_stream(prompt, **kw)       # checked at the call, before the first next()


def test_stream_checks_eagerly_with_generate_defaults(model):
    "generate_stream binds to generate's signature: a misspelt option fails at the call; the defaults are generate's."
    import inspect
    with pytest.raises(TypeError, match="generate_stream\\(\\): got an unexpected keyword argument 'temprature'"):
        model.generate_stream([1, 2], 5, temprature=0)
    sig = lambda f: {k: p.default for k, p in inspect.signature(f).parameters.items()}
    assert sig(Transformer.generate_stream) == sig(Transformer.generate)
    out = [[] for _ in range(2)]
    for step in model.generate_stream([[1, 2], [3]], 6, seed=5):   # default sampling, as generate's
        for o, t in zip(out, step):
            if t is not None: o.append(t)
    assert out == model.generate([[1, 2], [3]], 6, seed=5)


def test_input_forms(model):
    ref = model.generate([[3, 4, 5]], 5, temperature=0)
    assert model.generate([3, 4, 5], 5, temperature=0) == ref
    assert model.generate(torch.tensor([3, 4, 5]), 5, temperature=0) == ref
    assert model.generate(torch.tensor([[3, 4, 5]], dtype=torch.int32), 5, temperature=0) == ref
    assert model.generate((3, 4, 5), 5, temperature=0) == ref
    assert model.generate([torch.tensor([3, 4, 5])], 5, temperature=0) == ref
    assert model.generate([3, 4, 5], 0) == [[]]


def test_training_mode_and_grad_restored():
    drop = tiny(drop_resid=0.5, drop_emb=0.5, drop_attn=0.5).train()
    prompts = random_prompts(2, 2, 5, seed=13)
    assert drop.generate(prompts, 10, temperature=0) == drop.eval().generate(prompts, 10, temperature=0)  # no dropout
    drop.train(); drop.generate(prompts, 2)
    assert drop.training and torch.is_grad_enabled()


# ---------------------------------------------------------------- dtypes, devices

def test_bf16_model():
    m = tiny().to(torch.bfloat16)
    prompts = random_prompts(3, 1, 10, seed=14)
    out = m.generate(prompts, 12, temperature=0.7, top_k=10, seed=0)
    assert all(len(o) == 12 and all(0 <= t < V for t in o) for o in out)
    assert m.generate(prompts, 12, seed=0, temperature=0.7, top_k=10) == out
    with Recorder(m) as r: m.generate(prompts, 3, temperature=0)
    assert r.caches[0].k.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(model):
    prompts = random_prompts(4, 1, 10, seed=15)
    cpu = model.generate(prompts, 15, temperature=0)
    gpu = tiny().cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    assert gpu.generate(prompts, 15, temperature=0) == cpu
    assert gpu.generate(prompts, 15, seed=1) == gpu.generate(prompts, 15, seed=1)
    with pytest.raises(ValueError, match="generator"):
        gpu.generate(prompts, 2, generator=torch.Generator())


# ---------------------------------------------------------------- text

def test_generate_text_char():
    tok = CharTokenizer()
    m = tiny(vocab_size=tok.vocab_size)
    out = generate_text(m, tok, ["Hello", "A much longer prompt", ""], max_new_tokens=10, temperature=0)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    assert out[0] == generate_text(m, tok, "Hello", max_new_tokens=10, temperature=0)[0]
    ids = m.generate(tok.encode("Hello"), 10, temperature=0, eos_token_id=tok.eot_token)[0]
    if ids[-1] == tok.eot_token: ids = ids[:-1]
    assert out[0] == tok.decode(ids)
    assert out[2] == tok.decode([t for t in m.generate([tok.eot_token], 10, temperature=0, eos_token_id=tok.eot_token)[0] if t != tok.eot_token])


def test_generate_text_gpt2_padded_vocab():
    tok = GPT2Tokenizer()
    m = tiny(vocab_size=50304, emb_dim=16, n_heads=2)       # GPT-2's vocabulary padded to a multiple of 64
    with torch.no_grad(): m.head.weight[tok.vocab_size:] *= 50   # make the padding ids attractive
    raw = m.generate(tok.encode("Hello world"), 8, temperature=0)[0]
    assert any(t >= tok.vocab_size for t in raw)             # the model alone would produce undecodable ids
    out = generate_text(m, tok, ["Hello world", "The"], max_new_tokens=8, seed=0, top_k=50)
    assert all(isinstance(o, str) for o in out)
    ids = m.generate(tok.encode("Hello world"), 8, temperature=0,
                     processors=SuppressTokensProcessor(range(tok.vocab_size, 50304)))[0]
    assert all(t < tok.vocab_size for t in ids)
    assert generate_text(m, tok, "Hello world", max_new_tokens=8, temperature=0, stop_at_eot=False)[0] == tok.decode(ids)


# ---------------------------------------------------------------- imports

def fresh_python(code):
    "Run `code` in a new interpreter; it must print ok."
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_generate_needs_only_the_model_import():
    "In a fresh interpreter, importing `Transformer` is enough to generate (transformer.py imports inference_utils last)."
    code = ("import torch; from llm_playground.transformer import Transformer; torch.manual_seed(0); "
            "m = Transformer(vocab_size=11, context_length=8, emb_dim=8, n_layers=1, n_heads=2); "
            "out = m.generate([1, 2], 3, temperature=0); assert len(out[0]) == 3, out; "
            "s = m.generate_stream([1, 2], 2, temperature=0); assert len(list(s)) == 2; print('ok')")
    fresh_python(code)


def test_inference_utils_first_also_works():
    "The circular import works from either end: importing inference_utils first gives the same methods."
    code = ("import llm_playground.inference_utils as iu; from llm_playground.transformer import Transformer; "
            "assert Transformer.generate is iu.Transformer.generate; print('ok')")
    fresh_python(code)


def test_config_and_preprocess_do_not_import_torch():
    "lp_corpus and lp_preprocess start fast: their modules never import torch (nor the model)."
    code = ("import sys, llm_playground.config, llm_playground.preprocess; "
            "bad = [m for m in ('torch', 'llm_playground.transformer') if m in sys.modules]; assert not bad, bad; print('ok')")
    fresh_python(code)


def test_generate_text_signature_and_eos_error():
    "generate_text documents generate's sampling options (not those it sets) and refuses eos_token_id clearly."
    import inspect
    ps = inspect.signature(generate_text).parameters
    assert {"temperature", "top_k", "top_p", "repetition_penalty", "seed", "generator", "processors", "use_cache"} <= set(ps)
    assert not {"prompt_ids", "eos_token_id", "kwargs"} & set(ps)
    tok = CharTokenizer()
    m = tiny(vocab_size=tok.vocab_size)
    with pytest.raises(TypeError, match="stop_at_eot=False instead of eos_token_id"):
        generate_text(m, tok, "abc", max_new_tokens=3, eos_token_id=0)


# ---------------------------------------------------------------- speed tricks keep the tokens: layout, int8

def test_greedy_tokens_match_transformers():
    "Our fp32 greedy tokens (the decode loop with its [in, out] weight copies) are transformers' greedy tokens."
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=32, n_layer=2, n_head=4,
                                                              bos_token_id=V - 1, eos_token_id=V - 1)).eval()
    with torch.no_grad():
        for p in hf.parameters(): p.normal_(0, 0.1)     # larger weights: a random model that does not just repeat a token
    ours = Transformer.from_hf(hf.state_dict(), n_heads=4).eval()
    prompts = torch.tensor(random_prompts(3, 6, 6, seed=20))
    ref = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20, do_sample=False,
                      pad_token_id=0, eos_token_id=None)[:, 6:].tolist()
    assert len(set(map(tuple, ref))) > 1 and all(len(set(r)) > 3 for r in ref)   # a real test: varied tokens
    assert ours.generate(prompts, 20, temperature=0) == ref


def test_decode_model_shares_weights_and_leaves_model_alone(model):
    from torch import nn
    from llm_playground.inference_utils import _decode_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = _decode_model(model)
    assert fast is not model and fast.tok_emb.weight is model.tok_emb.weight and fast.cfg is model.cfg
    assert fast.blocks[0].mlp.fc.weight is model.blocks[0].mlp.fc.weight and type(fast.head) is not nn.Linear
    assert all(type(m) is nn.Linear for m in model.modules() if "Linear" in type(m).__name__)   # the model's own layers
    assert _decode_model(model, batch_size=2) is model
    model.generate([[1, 2, 3]], 5, temperature=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        ids = torch.tensor(random_prompts(2, 7, 7, seed=21))
        torch.testing.assert_close(fast(ids), model(ids), atol=1e-5, rtol=1e-5)


def _char_model_and_text():
    from pathlib import Path
    text = (Path(__file__).parent.parent / "data" / "fixtures" / "pride_and_prejudice_ch1.txt").read_text()
    tok = CharTokenizer.from_text(text)
    return tiny(vocab_size=tok.vocab_size, context_length=64), tok.encode(text)[:2048]


def test_int8_agrees_with_fp32_on_real_text():
    from llm_playground.inference_utils import Int8Linear, quantize_int8, top1_agreement
    m, ids = _char_model_and_text()
    q = quantize_int8(m)
    assert isinstance(q.head, Int8Linear) and isinstance(q.blocks[0].attn.qkv, Int8Linear)
    assert type(m.head) is torch.nn.Linear                                  # the original is unchanged
    assert top1_agreement(m, q, ids) >= 0.95
    assert top1_agreement(m, quantize_int8(m, dynamic=True), ids) >= 0.9
    # and a model that is not the same disagrees: the measure can fail
    assert top1_agreement(m, tiny(seed=1, vocab_size=m.cfg.vocab_size, context_length=64), ids) < 0.5


def test_int8_generation_contract(model):
    "A quantised model generates through the same loop: streaming, eos, batching and the cache all behave."
    from llm_playground.inference_utils import quantize_int8
    q = quantize_int8(model)
    prompts = random_prompts(3, 1, 10, seed=22)
    ref = q.generate(prompts, 12, temperature=0)
    assert all(len(r) == 12 and all(0 <= t < V for t in r) for r in ref)
    assert [list(r) for r in zip(*q.generate_stream(prompts, 12, temperature=0))] == ref
    assert q.generate(prompts, 12, seed=4, temperature=0.8) == q.generate(prompts, 12, seed=4, temperature=0.8)
    same = sum(a == b for r, o in zip(ref, model.generate(prompts, 12, temperature=0)) for a, b in zip(r, o))
    assert same >= 12      # close to fp32: at least the first tokens agree
