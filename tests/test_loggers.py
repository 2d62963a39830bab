"""trainer.loggers as a user runs them: lp_pretrain with TensorBoard (the event files read back by TensorBoard's own
reader equal metrics.jsonl, also after a resume), with W&B offline (no account), and the one-line errors for an unknown
logger or a missing package, before any run directory is made."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"
SMOKE = ["experiment=smoke", f"dataset.train={TEXT}", "trainer.device=cpu", "trainer.plot=false", "trainer.sampling.every_n_steps=6"]


def pretrain(out, *args, **env):
    return subprocess.run([sys.executable, "-m", "llm_playground.cli", "pretrain", *SMOKE, f"trainer.output_dir={out}", *args],
                          capture_output=True, text=True, timeout=180, env=environ(OMP_NUM_THREADS="1", **env))


def environ(**env):
    "The environment with `env` added (a None value removes that variable)."
    out = dict(os.environ, **env)
    return {k: v for k, v in out.items() if v is not None}


def rows(run_dir): return [json.loads(l) for l in (run_dir/"metrics.jsonl").read_text().splitlines()]


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir/"tensorboard")); ea.Reload()
    return ea


def check_equal(ea, metrics):
    "Each scalar tag holds, step for step, the values of its key in metrics.jsonl."
    for tag, key, split in [("train/loss", "loss", "train"), ("train/lr", "lr", "train"), ("train/grad_norm", "grad_norm", "train"),
                            ("train/tokens_per_s", "tokens_per_s", "train"), ("val/loss", "val_loss", "valid"), ("val/bpb", "val_bpb", "valid")]:
        want = [(r["step"], r[key]) for r in metrics if r["split"] == split]
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag  # (stored as float32)


def test_tensorboard_logger_and_resume(tmp_path):
    out = tmp_path/"models"
    args = ["trainer.loggers=[jsonl,tensorboard]", "trainer.max_steps=12", "trainer.save_steps=6", "trainer.keep_last=5",
            "trainer.eval_steps=6", f"dataset.validation={TEXT}"]
    r = pretrain(out, *args)
    assert r.returncode == 0, r.stderr
    run_dir = next(out.glob("smoke/*"))
    ea = events(run_dir)
    assert sorted(ea.Tags()["scalars"]) == ["train/grad_norm", "train/loss", "train/lr", "train/tokens", "train/tokens_per_s",
                                            "val/bpb", "val/loss", "val/ppl"]
    first = rows(run_dir)
    check_equal(ea, first)
    samples = [json.loads(l) for l in (run_dir/"samples.jsonl").read_text().splitlines()]
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in ea.Tensors("samples/text_summary")}
    assert sorted(texts) == sorted({s["step"] for s in samples}) and all(s["sample"].split("\n")[0] in texts[s["step"]] for s in samples)
    assert "loggers:" in ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    # a run that went on past its last good checkpoint: resume from step 6 with another learning rate, the same steps again
    shutil.rmtree(run_dir/"checkpoints"/"step_00000012")
    r = pretrain(out, *args, f"resume={run_dir}", "optimiser.lr=1e-3")
    assert r.returncode == 0, r.stderr
    assert "Resuming" in r.stdout
    second = rows(run_dir)
    assert [x["step"] for x in second] == [x["step"] for x in first]  # rows after step 6 replaced, not doubled
    assert [x.get("loss") for x in second if x["step"] > 6] != [x.get("loss") for x in first if x["step"] > 6]
    check_equal(events(run_dir), second)  # TensorBoard shows the resumed run's points, each step once (purge_step)


def test_wandb_offline_without_an_account(tmp_path):
    out, home = tmp_path/"models", tmp_path/"home"
    env = dict(WANDB_API_KEY=None, WANDB_MODE=None, NETRC=str(tmp_path/"no_netrc"), HOME=str(home), WANDB_CONFIG_DIR=str(home/"cfg"),
               WANDB_CACHE_DIR=str(home/"cache"), WANDB_DATA_DIR=str(home/"data"), WANDB_SILENT="true")
    r = pretrain(out, "trainer.loggers=[jsonl,wandb]", "trainer.max_steps=6", **env)
    assert r.returncode == 0, r.stderr
    run_dir = next(out.glob("smoke/*"))
    assert "no API key configured" in r.stdout + r.stderr
    run_id = (run_dir/"wandb_run_id.txt").read_text().strip()
    logs = list((run_dir/"wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 1 and logs[0].stat().st_size > 0
    # WANDB_MODE wins: disabled writes no W&B run at all
    r = pretrain(tmp_path/"off", "trainer.loggers=[wandb]", "trainer.max_steps=2", **dict(env, WANDB_MODE="disabled"))
    assert r.returncode == 0, r.stderr
    assert "no API key" not in r.stdout + r.stderr and not list((tmp_path/"off").glob("smoke/*/wandb/offline-run-*"))
    assert not list((tmp_path/"off").glob("smoke/*/metrics.jsonl"))  # jsonl not asked for


@pytest.mark.parametrize("loggers, shadow, mode, says", [
    ("[jsonl,tb]", False, None, "Unknown logger 'tb' in trainer.loggers: use jsonl, tensorboard, wandb"),
    ("[wandb]", True, None, 'needs the wandb package (wandb is not installed): pip install "llm-playground[wandb]"'),
    ("[wandb]", False, "ofline", "WANDB_MODE='ofline' is not a W&B mode")])
def test_bad_logger_fails_before_training(tmp_path, loggers, shadow, mode, says):
    hide = tmp_path/"shadow"/"wandb"; hide.mkdir(parents=True)  # a wandb that cannot be imported, as if it were not installed
    (hide/"__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n")
    path = os.pathsep.join([str(hide.parent)] * shadow + [os.environ.get("PYTHONPATH", "")])
    r = pretrain(tmp_path/"models", f"trainer.loggers={loggers}", PYTHONPATH=path, WANDB_MODE=mode)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert says in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (tmp_path/"models").exists()  # no run directory left behind
