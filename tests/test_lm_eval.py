"""The lm-evaluation-harness adapter as a user runs it: the harness's own command line (through lp_lm_eval), offline, on a
tiny trained checkpoint and a multiple-choice task of our own in a local file; its loglikelihoods checked against the
model's own scoring (log-softmax of the Transformer's logits), and the accuracy on questions the model cannot miss."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"
OFFLINE = dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")

# the context is text the model was trained on; the right answer continues it, the wrong ones are letters it never saw together
DOCS = [dict(context="It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a",
             choices=["wife.", "qzxjq"], answer=0),
        dict(context="My dear Mr. Bennet,", choices=["zqxjqzxjqzxjq", "said his lady"], answer=1),
        dict(context="", choices=["the", "qzq"], answer=0)]


def lp_lm_eval():
    exe = shutil.which("lp_lm_eval")
    return [exe] if exe else [sys.executable, "-m", "llm_playground.lm_eval_adapter"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval")/"models"
    r = subprocess.run([sys.executable, "-m", "llm_playground.cli", "pretrain", "experiment=smoke", f"dataset.train={TEXT}",
                        f"trainer.output_dir={out}", "trainer.device=cpu", "trainer.max_steps=120", "trainer.save_steps=0",
                        "trainer.sampling.prompts=[]", "trainer.plot=false", "optimiser.lr=1e-2"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, **OFFLINE))
    assert r.returncode == 0, r.stderr
    return next(out.glob("smoke/*"))


@pytest.fixture
def task_dir(tmp_path):
    d = tmp_path/"tasks"; d.mkdir()
    (d/"tiny_mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    (d/"tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d/'tiny_mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return d


def own_loglikelihood(model, tok, context: str, continuation: str) -> float:
    "log p(continuation | context) from the model's logits: the harness's split of the tokens (end-of-text for no context)."
    ctx = tok.encode(context) if context else [tok.eot_token]
    whole = tok.encode(context + continuation) if context else ctx + tok.encode(continuation)
    n, C = len(whole) - len(ctx), model.cfg.context_length
    x = torch.tensor(whole[:-1][-C:])[None]
    with torch.no_grad(): logp = F.log_softmax(model(x)[0].float(), -1)
    return sum(logp[x.shape[1] - n + j, whole[len(whole) - n + j]].item() for j in range(n))


def test_lm_eval_cli_offline_matches_the_models_own_scoring(run_dir, task_dir, tmp_path):
    r = subprocess.run([*lp_lm_eval(), "--model", "llm_playground", "--model_args", f"checkpoint={run_dir}", "--device", "cpu",
                        "--tasks", "tiny_mc", "--include_path", str(task_dir), "--batch_size", "2",
                        "--output_path", str(tmp_path/"out"), "--log_samples"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, **OFFLINE))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(next((tmp_path/"out").rglob("results_*.json")).read_text())
    assert results["results"]["tiny_mc"]["acc,none"] == 1.0   # the answers are obvious even to a tiny model
    samples = [json.loads(l) for l in next((tmp_path/"out").rglob("samples_tiny_mc_*.jsonl")).read_text().splitlines()]
    assert len(samples) == len(DOCS)
    from llm_playground.cli import load_model
    model, tok, _ = load_model(run_dir, "cpu")
    pairs = [(ctx_cont, resp) for s in samples for ctx_cont, [resp] in zip(
        [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()] if isinstance(s["arguments"], dict) else s["arguments"], s["resps"])]
    assert len(pairs) == sum(len(d["choices"]) for d in DOCS)
    for (ctx, cont), (ll, greedy) in pairs:
        assert float(ll) == pytest.approx(own_loglikelihood(model, tok, ctx, cont), abs=1e-4), (ctx, cont)


def test_context_longer_than_the_model_is_cut_from_the_left(run_dir):
    from lm_eval.api.instance import Instance
    from llm_playground.lm_eval_adapter import LLMPlaygroundLM, truncate_left
    lm = LLMPlaygroundLM(checkpoint=str(run_dir), device="cpu", batch_size=3)
    C = lm.max_length
    long_ctx = TEXT.read_text()[:5 * C]
    reqs = [Instance("loglikelihood", {}, (long_ctx, " of"), 0), Instance("loglikelihood", {}, (long_ctx[-(C - 2):], " of"), 1)]
    a, b = lm.loglikelihood(reqs, disable_tqdm=True)
    assert a[0] == pytest.approx(b[0], abs=1e-5)   # only the last C tokens before the last one count
    assert a[0] == pytest.approx(own_loglikelihood(lm.model, lm.tokenizer, long_ctx, " of"), abs=1e-4)
    inp, n = truncate_left(list(range(100)), [100, 101, 102], C)
    assert (len(inp), n, inp[-1]) == (C, 3, 101)
