"""The CPU speedrun recipe end to end, as real subprocesses: `lp_preprocess experiment=cpu_speedrun` learns its BPE,
`lp_pretrain experiment=cpu_speedrun` trains on a time budget and compares itself with xz, `lp_eval` scores held-out
text; and a Muon run resumed from a checkpoint ends with the same weights, bit for bit, as the run that went on."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llm_playground

TEXT = Path(llm_playground.__file__).parent/"data"/"tinyshakespeare.txt"


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llm_playground.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    "The first 120 KB of the packaged text to train on (preprocessed with the recipe), and the next 12 KB held out."
    d = tmp_path_factory.mktemp("speedrun")
    text = TEXT.read_text(encoding="utf-8")
    (d/"raw").mkdir(); (d/"raw"/"plays.txt").write_text(text[:120_000], encoding="utf-8")
    (d/"heldout.txt").write_text(text[120_000:132_000], encoding="utf-8")
    p = cli("preprocess", "experiment=cpu_speedrun", f"input_dir={d/'raw'}", f"out_dir={d/'data'}", "preprocessing.progress=false", cwd=d)
    assert p.returncode == 0, p.stderr
    return d


def test_recipe_preprocesses_with_its_bpe(shakespeare):
    m = json.loads((shakespeare/"data"/"manifest.json").read_text())
    assert m["tokenizer_file"]["path"] == "tokenizer.json" and (shakespeare/"data"/"tokenizer.json").is_file()
    assert 257 < m["vocab_size"] <= 4096
    tok = m["totals"]
    assert tok["utf8_bytes"]["train"] / tok["tokens"]["train"] > 2.5   # a BPE learned on the text: several bytes a token


def test_recipe_trains_on_a_budget_and_reports_xz(shakespeare):
    d = shakespeare
    p = cli("pretrain", "experiment=cpu_speedrun", f"dataset.train={d/'data'/'train'}", f"dataset.validation={d/'data'/'validation'}",
            f"trainer.output_dir={d/'models'}", "trainer.max_time=8", "trainer.progress=false", "trainer.plot=false", cwd=d)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "or 8 s of training" in out and "bits per byte" in out
    line = next(l for l in out.splitlines() if l.startswith("For comparison, xz -9e needs"))
    xz = float(line.split("needs ")[1].split(" ")[0])
    assert 1.5 < xz < 4.5, line
    run = next((d/"models"/"cpu_speedrun").glob("*_seed_*"))
    cfg = (run/"config.yaml").read_text()
    assert "name: muon" in cfg and "BPETokenizer" in cfg and (run/"tokenizer.json").is_file()
    rows = [json.loads(l) for l in (run/"metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and max(r["step"] for r in rows) >= 20                 # it trained (a step takes well under a second)
    st = torch.load(next((run/"checkpoints").glob("step_*"))/"state.pt", weights_only=True)
    assert 8 <= st["train_time"] < 8 + 5                                 # stopped when the budget was spent
    samples = [json.loads(l) for l in (run/"samples.jsonl").read_text().splitlines()]
    assert samples and samples[-1]["prompt"] == "ROMEO:"
    e = cli("eval", f"checkpoint={run}", f"text={d/'heldout.txt'}", f"out={d/'eval.json'}", "progress=false", cwd=d)
    assert e.returncode == 0, e.stderr
    res = json.loads((d/"eval.json").read_text())
    assert res["bytes"] == len((d/"heldout.txt").read_bytes()) and 1.0 < res["bpb"] < 8.0
    assert res["bpb"] == pytest.approx(res["loss"] / 0.6931471805599453 * res["tokens"] / res["bytes"], rel=1e-6)


def test_muon_resume_is_bit_exact(tmp_path):
    "A Muon run resumed from its step-6 checkpoint ends at step 12 with the weights of the run that never stopped (fp32)."
    text = tmp_path/"t.txt"; text.write_text(TEXT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    common = ["experiment=smoke", "optimiser=muon", "optimiser.lr=1e-2", f"dataset.train={text}", "trainer.precision=fp32",
              "trainer.device=cpu", "trainer.max_steps=12", "trainer.save_steps=6", "trainer.keep_last=5", "trainer.plot=false",
              "trainer.progress=false", "trainer.sampling.show=false"]
    ref = cli("pretrain", *common, f"trainer.output_dir={tmp_path/'a'}", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    run = next((tmp_path/"a").glob("*/*_seed_*"))
    copy = tmp_path/"b"/run.parent.name/run.name
    shutil.copytree(run, copy)
    shutil.rmtree(copy/"checkpoints"/"step_00000012")
    res = cli("pretrain", *common, f"trainer.output_dir={tmp_path/'b'}", f"resume={copy}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    w1, w2 = (load_file(r/"checkpoints"/"step_00000012"/"model.safetensors") for r in (run, copy))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    opt = torch.load(run/"checkpoints"/"step_00000012"/"optimizer.pt", weights_only=True)
    assert any(g.get("muon") for g in opt["param_groups"])
