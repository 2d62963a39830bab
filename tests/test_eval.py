"""lp_eval as a user runs it: a trained run measured on a real text (loss, perplexity, bits per byte, JSON out), and
the bad inputs: empty, not UTF-8, too short, no such run."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"


def run(*args, **env):
    return subprocess.run([sys.executable, "-m", "llm_playground.cli", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")/"models"
    r = run("pretrain", "experiment=smoke", f"dataset.train={TEXT}", f"trainer.output_dir={out}", "trainer.device=cpu",
            "trainer.max_steps=30", "trainer.save_steps=0", "trainer.sampling.prompts=[]", "trainer.plot=false")
    assert r.returncode == 0, r.stderr
    return next(out.glob("smoke/*"))


def test_eval_a_text(run_dir, tmp_path):
    valid = tmp_path/"valid.txt"; valid.write_text(TEXT.read_text()[-600:])
    r = run("eval", f"checkpoint={run_dir}", f"text={valid}", f"out={tmp_path/'res.json'}", "device=cpu")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path/"res.json").read_text())
    assert res["tokens"] == res["bytes"] == 600   # characters of ASCII text: one token, one byte each
    assert math.isclose(res["bpb"], res["loss"] / math.log(2))
    assert res["bpb"] < math.log2(101)            # better than a uniform guess over the character vocabulary after 30 steps
    assert f"loss {res['loss']:.4f} nats/token" in r.stdout and f"{res['bpb']:.4f} bits per byte" in r.stdout
    # the same run found as `latest` under the project root; stride changes only which context each token gets
    r2 = run("eval", "checkpoint=latest", f"text={valid}", "stride=4", "device=cpu", LLM_PLAYGROUND_ROOT=str(run_dir.parents[2]))
    assert r2.returncode == 0, r2.stderr
    assert "bits per byte" in r2.stdout


@pytest.mark.parametrize("content, says", [(b"", "is empty"), (b"caf\xe9 au lait", "is not UTF-8 text (invalid byte b'\\xe9' at offset 3)"),
                                           (b"a", "too short to measure: 1 token(s)")])
def test_eval_bad_text(run_dir, tmp_path, content, says):
    f = tmp_path/"t.txt"; f.write_bytes(content)
    r = run("eval", f"checkpoint={run_dir}", f"text={f}", "device=cpu")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("lp_eval: error:") and says in r.stderr, r.stderr


def test_eval_no_such_run(tmp_path):
    (tmp_path/"t.txt").write_text("Some text to measure.")
    r = run("eval", f"checkpoint={tmp_path/'nowhere'}", f"text={tmp_path/'t.txt'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "No checkpoint found" in r.stderr
    r = run("eval", f"checkpoint={tmp_path/'nowhere'}")
    assert r.returncode == 2 and "Say what to measure" in r.stderr
