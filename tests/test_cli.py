"""The command-line tools as a user runs them: lp_pretrain (train a few steps), lp_sample (sample from the result),
config validation before any work, and the Python one-call loader."""
import os, shutil, string, subprocess, sys
from pathlib import Path

import pytest

from llm_playground.cli import load_model, validate_pretrain_config
from llm_playground.config import ConfigError, compose_config


def cmd(name):
    "The console script if installed, else the same entry point through `python -m llm_playground.cli`."
    exe = shutil.which(f"lp_{name}")
    return [exe] if exe else [sys.executable, "-m", "llm_playground.cli", name]


def run(*args, cwd=None, **env):
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1", **env))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A run of the seed's example command on a small real text, a few steps."
    from pydoc_data.topics import topics
    d = tmp_path_factory.mktemp("cli")
    text = "".join(c for c in "\n\n".join(topics[k] for k in ("if", "while", "for", "try")) if c in string.printable)
    (d/"train.txt").write_text(text)
    r = run(*cmd("pretrain"), "experiment=smoke", "trainer.experiment_name=my_experiment", "trainer.num_epochs=5",
            "optimiser.lr=3e-4", "optimiser=adamw_large_batch", f"dataset.train={d/'train.txt'}", f"trainer.output_dir={d/'models'}",
            "trainer.max_steps=6", "trainer.device=cpu", cwd=d)
    assert r.returncode == 0, r.stderr
    runs = list((d/"models"/"my_experiment").glob("*_seed_42"))
    assert len(runs) == 1
    return runs[0], r


def test_pretrain_writes_a_run_directory(trained):
    run_dir, r = trained
    assert "Run directory" in r.stdout and "Done: step 6" in r.stdout
    for f in ("config.yaml", "metrics.jsonl", "loss.png", "samples.jsonl", "checkpoints/step_00000006/model.safetensors",
              "checkpoints/step_00000006/checkpoint.json"):
        assert (run_dir/f).exists(), f
    cfg = (run_dir/"config.yaml").read_text()
    assert "lr: 0.0003" in cfg and "num_epochs: 5" in cfg   # the command-line values win over the group's


def test_sample_from_the_run(trained):
    run_dir, _ = trained
    r = run(*cmd("sample"), f"checkpoint={run_dir}", "prompt=The", "max_new_tokens=12", "temperature=0", "device=cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The") and len(r.stdout.strip()) == 3 + 12
    r2 = run(*cmd("sample"), f"checkpoint={run_dir}/checkpoints/step_00000006", "prompts=[The,In]", "max_new_tokens=12",
             "temperature=0", "stream=false", "device=cpu")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.splitlines()[0] == r.stdout.splitlines()[0]  # streamed or not, same greedy text
    assert len(r2.stdout.splitlines()) == 2


def test_load_model_in_one_call(trained):
    run_dir, _ = trained
    model, tok, cfg = load_model(run_dir, device="cpu")
    assert (model.cfg.n_layers, tok.vocab_size, cfg.trainer.experiment_name) == (2, 101, "my_experiment")
    assert not model.training


def test_sample_latest_run(trained):
    run_dir, _ = trained
    r = run(*cmd("sample"), "prompt=The", "max_new_tokens=5", "temperature=0", "device=cpu", "stream=false",
            LLM_PLAYGROUND_ROOT=str(run_dir.parent.parent.parent))  # the root whose models/ holds the run
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The")


def test_typos_fail_before_any_work(tmp_path):
    r = run(*cmd("pretrain"), "trainer.num_epochz=3", f"trainer.output_dir={tmp_path}")   # a bad setting: exit status 2, one line
    assert r.returncode == 2 and r.stderr == "lp_pretrain: error: Unknown config key trainer.num_epochz. Did you mean trainer.num_epochs?\n", r.stderr
    r = run(*cmd("pretrain"), "+trainer.num_epochz=3", f"trainer.output_dir={tmp_path}")  # added with +: caught by the schema
    assert r.returncode == 2 and "Did you mean: num_epochs" in r.stderr and "Traceback" not in r.stderr
    r = run(*cmd("pretrain"), "optimiser.lr=fast", f"trainer.output_dir={tmp_path}")
    assert r.returncode == 2 and "optimiser.lr" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run(*cmd("sample"), "temprature=0.5")
    assert r.returncode == 2 and "Did you mean temperature?" in r.stderr, r.stderr
    r = run(*cmd("sample"), "device=cpu", LLM_PLAYGROUND_ROOT=str(tmp_path))  # checkpoint=latest, but no run there
    assert r.returncode == 1 and "No trained run" in r.stderr and "checkpoint=" in r.stderr
    r = run(*cmd("sample"), f"checkpoint={tmp_path}/nothing")
    assert r.returncode == 1 and "No checkpoint found" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def test_data_errors_are_one_line(tmp_path):
    (tmp_path/"short.txt").write_text("Too short.")
    r = run(*cmd("pretrain"), "experiment=smoke", f"dataset.train={tmp_path/'short.txt'}", "dataset.validation=null",
            f"trainer.output_dir={tmp_path/'models'}", "trainer.device=cpu")
    assert r.returncode == 1 and "max_length" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_group_swaps_and_presets():
    c = validate_pretrain_config(compose_config("pretrain", ["optimiser=adamw_large_batch", "trainer/sampling=creative"]))
    assert (c.optimiser.lr, c.trainer.sampling.top_k) == (1.5e-3, 50)
    v = validate_pretrain_config(compose_config("pretrain", ["experiment=pretrain_verdict"]))
    assert (v.model.emb_dim, v.model.n_layers, v.model.context_length, v.optimiser.lr, v.optimiser.weight_decay) == (768, 12, 256, 4e-4, 0.1)
    assert (v.trainer.num_epochs, v.dataset.batch_size, v.dataset.stride, v.dataset.max_length) == (10, 2, 256, 256)
    with pytest.raises(ConfigError, match="model.n_heads"):
        validate_pretrain_config(compose_config("pretrain", ["model.n_heads=7"]))


def test_time_budget(tmp_path):
    "`trainer.max_time` ends a run that would otherwise take 100,000 steps, with its decay complete and a final checkpoint."
    import json
    text = Path(__file__).resolve().parents[1]/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"
    r = run(*cmd("pretrain"), "experiment=smoke", f"dataset.train={text}", f"trainer.output_dir={tmp_path}", "trainer.device=cpu",
            "trainer.max_steps=100000", "trainer.max_time=3", "trainer.save_steps=0", "trainer.log_steps=1", "trainer.sampling.prompts=[]",
            "optimiser.lr=3e-3", "optimiser.warmup_steps=2")
    assert r.returncode == 0, r.stderr
    assert "or 3 s of training, whichever ends first" in r.stdout
    run_dir = next(tmp_path.glob("smoke/*"))
    rows = [json.loads(l) for l in (run_dir/"metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["step"]
    assert 10 < last < 100000
    assert (run_dir/"checkpoints"/f"step_{last:08d}").is_dir()
    assert abs(rows[-1]["lr"] - 3e-4) < 1e-9   # min_lr_ratio (0.1) of the peak: the schedule ended with the budget


def test_bpe_from_preprocess_to_sample(tmp_path):
    "tokenizer=bpe: lp_preprocess trains it, and lp_pretrain, lp_sample and lp_eval find it without being told, even after the run moves."
    import json, shutil
    text = (Path(__file__).resolve().parents[1]/"data"/"fixtures"/"pride_and_prejudice_ch1.txt").read_text()
    (tmp_path/"raw").mkdir(); (tmp_path/"raw"/"a.txt").write_text(text * 3)
    r = run(*cmd("preprocess"), "tokenizer=bpe", "tokenizer.vocab_size=320", f"input_dir={tmp_path/'raw'}", f"out_dir={tmp_path/'data'}")
    assert r.returncode == 0, r.stderr
    r = run(*cmd("pretrain"), "experiment=smoke", "tokenizer=bpe", "model.vocab_size=320", f"dataset.train={tmp_path/'data'/'train'}",
            f"dataset.validation={tmp_path/'data'/'validation'}", f"trainer.output_dir={tmp_path/'models'}", "trainer.max_steps=4",
            "trainer.device=cpu", "trainer.sampling.prompts=[]")
    assert r.returncode == 0, r.stderr
    run_dir = next((tmp_path/"models").glob("smoke/*"))
    assert (run_dir/"tokenizer.json").is_file() and "path: tokenizer.json" in (run_dir/"config.yaml").read_text()
    moved = tmp_path/"elsewhere"; shutil.move(str(run_dir), moved); shutil.rmtree(tmp_path/"data")
    r = run(*cmd("sample"), f"checkpoint={moved}", "prompt=It is", "max_new_tokens=5", "device=cpu")
    assert r.returncode == 0 and r.stdout.startswith("It is"), r.stderr
    (tmp_path/"v.txt").write_text(text[-500:])
    r = run(*cmd("eval"), f"checkpoint={moved}", f"text={tmp_path/'v.txt'}", f"out={tmp_path/'e.json'}", "device=cpu")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path/"e.json").read_text())
    assert res["bytes"] == 500 and res["tokens"] < 500   # a BPE token covers more than one byte
