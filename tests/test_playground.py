"The playground widgets driven headless (set `.value`, `.click()`), on every kind of model the library loads."
import os, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llm_playground.checkpoint import verify_checkpoint
from llm_playground.cli import load_model
from llm_playground.dataloader import NextTokenPredictionDataset, create_dataloader
from llm_playground.playground import (TrainingMonitor, explore, explore_attention, explore_lens, logit_lens,
                                       next_token_candidates, token_scores)
from llm_playground.tokenizer import CharTokenizer, GPT2Tokenizer
from llm_playground.trainer import Trainer, read_metrics
from llm_playground.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT/"data/fixtures/pride_and_prejudice_ch1.txt").read_text(encoding="utf-8")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def char():
    tok = CharTokenizer.from_text(TEXT)
    dl = create_dataloader(NextTokenPredictionDataset(torch.tensor(tok.encode(TEXT)), max_length=16, stride=16),
                           batch_size=8, seed=0, pin_memory=False)
    return tok, dl


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return Transformer(vocab_size=tok.vocab_size, context_length=16, emb_dim=32, n_layers=2, n_heads=2)


def _trainer(tok, dl, run_dir, steps=6, seed=0):
    "A tiny trainer; a constant learning rate, so that runs of different lengths take the same steps."
    return Trainer(_model(tok, seed), dl, tokenizer=tok, run_dir=run_dir, opt_cfg=dict(schedule="constant", warmup_ratio=0.0),
                   cfg=dict(max_steps=steps, save_steps=0, log_steps=1, eval_steps=0, device="cpu", precision="fp32",
                            progress=False, plot=False, sampling=dict(prompts=["It is"], every_epoch=False, show=False,
                                                                      max_new_tokens=8)))


def _drive(model, tok, prompt):
    "Use every widget the way a person would; return what they showed."
    w = explore(model, tok, prompt=prompt, n=5)
    png = w.chart.value
    w.temperature.value = 1.8
    assert w.chart.value != png, "the chart did not follow the temperature slider"
    assert w.candidates.entropy_after > w.candidates.entropy_before
    w.top_k.value = 2
    assert w.candidates.kept == 2 and [b.disabled for b in w.candidate_buttons.children] == w.candidates.removed
    n = len(w.ids)
    w.greedy_button.click(); w.sample_button.click()
    pick = w.candidates.ids[1]; w.candidate_buttons.children[1].click()
    assert len(w.ids) == n + 3 and w.ids[-1] == pick
    assert w.text.value.count("class='lp-tok'") == min(len(w.ids), model.cfg.context_length)
    w.undo_button.click(); assert len(w.ids) == n + 2
    a = explore_attention(model, tok, prompt)
    grid = a.grid.value
    a.layer.value = model.cfg.n_layers - 1
    assert a.grid.value != grid
    lw = explore_lens(model, tok, prompt)
    img = lw.chart.value
    lw.value.value = "next"
    assert lw.chart.value != img
    return w, a, lw


def test_explorers_on_a_fresh_char_model(char):
    tok, _ = char
    w, a, lw = _drive(_model(tok), tok, "It is a truth")
    assert a.weights.shape == (2, 2, 13, 13)
    assert lw.lens.top_ids.shape == (3, 13)


def test_explorers_on_a_run_loaded_with_load_model(char, tmp_path):
    "A run directory with its config (as lp_pretrain writes it): load_model rebuilds the model and its tokenizer."
    tok, dl = char
    t = _trainer(tok, dl, tmp_path)
    t.snapshot = OmegaConf.create(dict(model=dict(vars(t.model.cfg)),
                                       tokenizer={"_target_": "llm_playground.tokenizer.CharTokenizer", "chars": tok.chars}))
    t.fit()
    model, tok2, cfg = load_model(tmp_path, device="cpu")
    assert tok2.chars == tok.chars and model.cfg.n_layers == 2
    _drive(model, tok2, "Mr. Bennet")
    c, c0 = next_token_candidates(model, tok2, tok.encode("Mr. ")), next_token_candidates(t.model.eval(), tok, tok.encode("Mr. "))
    assert c.ids == c0.ids
    torch.testing.assert_close(torch.tensor(c.before), torch.tensor(c0.before))


def test_explorers_on_hf_gpt2_weights_and_bpe():
    "Transformer.from_hf on a (random, offline) transformers GPT2LMHeadModel, with GPT-2's BPE tokenizer."
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: from_hf is tested without it elsewhere")
    torch.manual_seed(0)
    tok = GPT2Tokenizer()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    model = Transformer.from_hf(hf.state_dict(), n_heads=2).eval()
    w, a, lw = _drive(model, tok, "Every effort moves you")
    assert w.candidates.labels[0] == w.candidate_buttons.children[0].description.rsplit(" ", 1)[0]
    ids = tok.encode("Every effort moves you")
    with torch.no_grad(): hf_next = hf(torch.tensor([ids])).logits[0, -1].softmax(-1)
    torch.testing.assert_close(torch.tensor(next_token_candidates(model, tok, ids).before), hf_next.topk(10).values, atol=1e-5, rtol=1e-4)
    assert [s["id"] for s in token_scores(model, tok, ids)] == ids
    assert logit_lens(model, tok, ids).top_ids[-1].tolist() == hf(torch.tensor([ids])).logits[0].argmax(-1).tolist()


def test_stop_button_from_another_thread_leaves_a_resumable_checkpoint(char, tmp_path):
    "A click during a background fit stops it after a step, with a checkpoint that resumes to the same losses."
    tok, dl = char
    (tmp_path/"a").mkdir(); t = _trainer(tok, dl, tmp_path/"a", steps=10_000)
    m = TrainingMonitor(min_interval=0, sample_steps=0)
    m.fit(t)
    deadline = time.time() + 60
    while t.step < 3 and time.time() < deadline: time.sleep(0.01)
    m.stop_button.click()
    assert m.wait(timeout=60) and m.stopped_at == t.step >= 3
    ckpt = t.last_checkpoint
    assert ckpt.name == f"step_{t.step:08d}" and verify_checkpoint(ckpt)["step"] == t.step
    assert m.status.value.startswith(f"stopped at step {t.step}") and str(ckpt) in m.status.value
    stop = t.step
    # resume to stop + 4 steps; the same run uninterrupted gives the same losses
    t2 = _trainer(tok, dl, tmp_path/"a", steps=stop + 4); t2.load_checkpoint(tmp_path/"a"); t2.fit()
    t0 = _trainer(tok, dl, None, steps=stop + 4).fit()
    resumed = [r["loss"] for r in read_metrics(tmp_path/"a") if r.get("split") == "train"]
    assert len(resumed) == stop + 4
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor([r["loss"] for r in t0.history]), atol=1e-6, rtol=0)


def test_monitor_shows_samples_and_bits_per_byte(char):
    "Samples at the sampling cadence; a third panel once rows carry val_bpb."
    tok, dl = char
    t = _trainer(tok, dl, None, steps=4)
    m = TrainingMonitor(min_interval=0, sample_steps=2)
    m.fit(t, background=False)
    assert "samples at step 4" in m.samples.value and m.last_samples[0].startswith("It is")
    assert m.status.value == "finished of 4" and m.stop_button.disabled
    from llm_playground.playground import monitor_figure
    rows = t.history + [dict(step=4, split="valid", val_loss=3.0, val_bpb=4.2)]
    assert len(monitor_figure(rows).axes) == 3


def test_missing_ipywidgets_is_one_clear_error(tmp_path):
    "Without ipywidgets (its import really fails), the rest of the library works and the playground names what to install."
    code = ("import sys; sys.modules['ipywidgets'] = None\n"      # `import ipywidgets` now raises ImportError
            "import llm_playground.cli, llm_playground.utils\n"
            "try: import llm_playground.playground\n"
            "except llm_playground.utils.UserError as e: print(type(e).__name__, e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("MissingDependencyError llm_playground.playground needs ipywidgets >= 8: pip install 'ipywidgets>=8' "
                                "(pip install llm-playground installs it).")
