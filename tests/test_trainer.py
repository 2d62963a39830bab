"""Trainer behaviour the notebook does not pin down: bf16 autocast training on real text, gradient accumulation
equivalence, the schedule's length, the non-finite-loss stop, and precision checks."""
import json, math, platform, string, subprocess, sys

import numpy as np
import pytest
import torch

from llm_playground.config import ConfigError, seed_everything
from llm_playground.dataloader import NextTokenPredictionDataset, create_dataloader
from llm_playground.tokenizer import CharTokenizer
from llm_playground.checkpoint import list_checkpoints, verify_checkpoint
from llm_playground.optimiser import param_groups
from llm_playground.trainer import Callback, NonFiniteLossError, Trainer, lm_loss
from llm_playground.transformer import Transformer


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    "A small real-text fixture written to a temp dir (Python's documentation prose, printable ASCII)."
    from pydoc_data.topics import topics
    t = "".join(c for c in "\n\n".join(topics[k] for k in ("assignment", "exceptions", "if", "while", "for", "try", "class"))
                if c in string.printable)
    p = tmp_path_factory.mktemp("text")/"corpus.txt"
    p.write_text(t)
    return p


def loaders(path, batch_size=8, max_length=32):
    tok = CharTokenizer()
    ids = np.array(tok.encode(path.read_text()))
    n = len(ids) // 10
    tr = create_dataloader(NextTokenPredictionDataset(ids[:-n], max_length=max_length), batch_size=batch_size, seed=0, pin_memory=False)
    va = create_dataloader(NextTokenPredictionDataset(ids[-n:], max_length=max_length), batch_size=batch_size, shuffle=False,
                           drop_last=False, pin_memory=False)
    return tok, tr, va


def model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(vocab_size=tok.vocab_size, context_length=32, emb_dim=64, n_layers=2, n_heads=4, **kw)


def test_bf16_autocast_training_reduces_the_loss(text):
    tok, tr, va = loaders(text)
    seed_everything(0)
    t = Trainer(model(tok), tr, va, cfg=dict(device="cpu", precision="bf16", max_steps=150, progress=False, eval_steps=0,
                                             eval_max_batches=8),
                opt_cfg=dict(lr=3e-3, warmup_steps=10), default_cbs=False)
    before = t.evaluate()["val_loss"]
    t.fit()
    after = t.evaluate()["val_loss"]
    assert t.precision == "bf16" and math.isfinite(after)
    assert before > 4.0 and after < before - 1.3, (before, after)  # from ~ln(101) to well below the unigram entropy
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # autocast keeps fp32 master weights


def test_gradient_accumulation_matches_a_big_batch(text):
    "2 micro-batches of 4 give the same update as one batch of 8 (no dropout, fp32, SGD)."
    tok = CharTokenizer()
    ids = np.array(tok.encode(text.read_text()))[:4000]
    ds = NextTokenPredictionDataset(ids, max_length=32)
    big = create_dataloader(ds, batch_size=8, seed=1, pin_memory=False)
    small = create_dataloader(ds, batch_size=4, seed=1, pin_memory=False)
    cfg = dict(device="cpu", precision="fp32", max_steps=5, max_grad_norm=0.0)
    opt = dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant")
    a = Trainer(model(tok), big, cfg=cfg, opt_cfg=opt, default_cbs=False).fit()
    b = Trainer(model(tok), small, cfg=dict(cfg, grad_accum_steps=2), opt_cfg=opt, default_cbs=False).fit()
    assert a.tokens_seen == b.tokens_seen == 5 * 8 * 32
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_fit_trains_even_under_no_grad(text):
    "A notebook (or a caller) that switched gradients off globally must not break training."
    tok, tr, _ = loaders(text)
    t = Trainer(model(tok), tr, cfg=dict(device="cpu", precision="fp32", max_steps=2, progress=False), default_cbs=False)
    before = [p.detach().clone() for p in t.model.parameters()]
    with torch.no_grad(): t.fit()
    assert t.step == 2 and any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_total_steps_from_epochs_batches_and_accumulation(text):
    tok, tr, va = loaders(text)
    t = Trainer(model(tok), tr, cfg=dict(device="cpu", num_epochs=3, grad_accum_steps=4), opt_cfg=dict(warmup_ratio=0.1), default_cbs=False)
    assert t.total_steps == 3 * math.ceil(len(tr) / 4)
    assert t.sched.lr_lambdas[0].warmup_steps == round(0.1 * t.total_steps)
    t2 = Trainer(model(tok), tr, cfg=dict(device="cpu", num_epochs=3, max_steps=7), default_cbs=False)
    assert t2.total_steps == 7


def test_param_groups_with_tied_weights():
    tok = CharTokenizer()
    m = model(tok, tie_weights=True)
    decay, no_decay = param_groups(m, 0.1)
    assert "head.weight" not in decay["names"] + no_decay["names"] or "head.weight" in no_decay["names"]
    assert "tok_emb.weight" in no_decay["names"] and "pos_emb.weight" in no_decay["names"]
    assert all(n.endswith("weight") and "ln" not in n for n in decay["names"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in m.parameters())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text, tmp_path):
    tok, tr, va = loaders(text)
    calls = {"n": 0}
    def loss(logits, y):  # inf from the 10th training step on (the weight checks before each save run without gradients)
        calls["n"] += torch.is_grad_enabled()
        return lm_loss(logits, y) * (float("inf") if calls["n"] > 9 else 1.0)
    t = Trainer(model(tok), tr, cfg=dict(device="cpu", max_steps=20, save_steps=3, progress=False), run_dir=tmp_path, loss_func=loss)
    with pytest.raises(NonFiniteLossError, match="loss is inf at step 10") as e:
        t.fit()
    assert f"the last good one is {tmp_path/'checkpoints'/'step_00000009'}" in str(e.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006", "step_00000009"]
    verify_checkpoint(list_checkpoints(tmp_path)[-1])
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_precision_and_device_checks(text):
    tok, tr, va = loaders(text)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs CUDA"):
            Trainer(model(tok), tr, cfg=dict(device="cpu", precision="fp16"))
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Trainer(model(tok), tr, cfg=dict(device="cuda"))
    with pytest.raises(ConfigError, match="trainer.precision"):
        Trainer(model(tok), tr, cfg=dict(device="cpu", precision="int8"))


def test_signature_defaults_are_the_schema_defaults():
    "A parameter named after a schema field has no default, or the schema's default (refer to it: one source)."
    import dataclasses, inspect
    from llm_playground import callbacks, checkpoint, optimiser, trainer
    from llm_playground.checkpoint import find_checkpoint
    from llm_playground.optimiser import LRSchedule, OptimiserConfig
    from llm_playground.trainer import SamplingConfig, TrainerConfig
    schemas = [OptimiserConfig, TrainerConfig, SamplingConfig]
    default = lambda f: f.default if f.default is not dataclasses.MISSING else f.default_factory()
    fields = {}  # field name -> [(schema, its default)]
    for s in schemas:
        for f in dataclasses.fields(s): fields.setdefault(f.name, []).append((s.__name__, default(f)))
    aliases = {(LRSchedule, "min_ratio"): "min_lr_ratio", (LRSchedule, "kind"): "schedule",
               (find_checkpoint, "fallback"): "resume_fallback"}  # parameters named differently from their field
    callables = []
    for mod in (optimiser, trainer, callbacks, checkpoint):
        for name, obj in vars(mod).items():
            if getattr(obj, "__module__", None) != mod.__name__ or dataclasses.is_dataclass(obj): continue
            if inspect.isfunction(obj): callables.append(obj)
            elif inspect.isclass(obj):
                callables += [obj] + [m for m in vars(obj).values() if inspect.isfunction(m)]
    checked, wrong = set(), []
    for fn in callables:
        try: params = inspect.signature(fn).parameters.values()
        except ValueError: continue  # e.g. an exception class
        for p in params:
            field_name = aliases.get((fn, p.name), p.name)
            if field_name not in fields or p.default is inspect.Parameter.empty or p.default is None: continue
            checked.add(f"{fn.__qualname__}.{p.name}")
            if any(p.default != d for _, d in fields[field_name]): wrong.append((fn.__qualname__, p.name, p.default, fields[field_name]))
    assert not wrong, wrong
    assert {"LRSchedule.warmup_steps", "LRSchedule.min_ratio", "LRSchedule.kind", "MetricsCB.log_steps", "EvalCB.eval_steps",
            "CheckpointCB.save_steps", "CheckpointCB.keep_last", "CheckpointCB.keep_best", "prune_checkpoints.keep_last",
            "prune_checkpoints.keep_best", "find_checkpoint.fallback"} <= checked, sorted(checked)
    assert inspect.signature(param_groups).parameters["weight_decay"].default is inspect.Parameter.empty


FAULTS_AFTER_FIT = """
import json, resource, sys, torch
from llm_playground.trainer import Trainer
from llm_playground.transformer import Transformer
torch.manual_seed(0)
data = [(torch.randint(0, 64, (2, 16)),) * 2] * 2
Trainer(Transformer(vocab_size=64, context_length=16, emb_dim=16, n_layers=1, n_heads=2), data,
        cfg=dict(device="cpu", precision="fp32", max_steps=2, reuse_memory=sys.argv[1] == "1"), default_cbs=False).fit()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2): x = torch.ones(2**24); del x  # 64 MB: the first ones fault their pages in in any case
per_round = []
for _ in range(7):
    f0 = faults(); x = torch.ones(2**24); del x; per_round.append(faults() - f0)
print(json.dumps(sorted(per_round)[3]))  # the median round (now and then the heap's layout makes one round fault again)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="reuse_freed_memory acts on glibc's malloc only")
def test_fit_keeps_freed_memory_for_reuse_only_when_asked():
    "After `fit` with trainer.reuse_memory (the default) a 64 MB tensor reuses freed pages; with it off, each one is faulted in afresh."
    faults = {on: json.loads(subprocess.run([sys.executable, "-c", FAULTS_AFTER_FIT, on], capture_output=True, text=True,
                                            check=True).stdout) for on in ("1", "0")}
    assert faults["1"] < 100, faults    # 64 MB = 16,384 pages of 4 KiB (fewer, larger ones with transparent huge pages)
    assert faults["0"] > 20 * max(faults["1"], 1), faults
