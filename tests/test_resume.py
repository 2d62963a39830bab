"""Kill-and-resume: a run killed at random moments (also while a checkpoint is being written) and resumed each time
logs the same losses and ends with the same weights, bit for bit (CPU, fp32), as a run that was never interrupted."""
import json, os, random, signal, string, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_playground.trainer import Callback, Trainer

ROOT = Path(__file__).resolve().parents[1]


def real_text() -> str:
    "A few KB of real English prose (Python's own documentation), printable ASCII only."
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in ("assignment", "exceptions", "if", "while", "for", "try", "function"))
    return "".join(c for c in text if c in string.printable)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    text = real_text()
    n = len(text) // 10
    (d/"train.txt").write_text(text[:-n]); (d/"valid.txt").write_text(text[-n:])
    return d


def common(data, out, name):
    return ["experiment=smoke", f"dataset.train={data/'train.txt'}", f"dataset.validation={data/'valid.txt'}",
            "dataset.max_length=16", "dataset.batch_size=4", "dataset.seed=3", f"trainer.output_dir={out}",
            f"trainer.experiment_name={name}", "trainer.device=cpu", "trainer.precision=fp32", "trainer.max_steps=48",
            "trainer.save_steps=4", "trainer.log_steps=1", "trainer.eval_steps=10", "trainer.eval_max_batches=3",
            "trainer.keep_last=2", "trainer.grad_accum_steps=2", "model.drop_resid=0.1", "model.drop_attn=0.1",
            "trainer.sampling.every_n_steps=10", "trainer.sampling.temperature=0.9", "trainer.sampling.show=false"]


def pretrain_cmd(*args):
    return [sys.executable, "-m", "llm_playground.cli", "pretrain", *args]


def env(delay=0.0):
    e = dict(os.environ, LLM_PLAYGROUND_CKPT_DELAY=str(delay), OMP_NUM_THREADS="1")
    return e


def run_dir_of(out, name) -> Path:
    dirs = sorted((Path(out)/name).glob("*_seed_*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def train_losses(run_dir):
    rows = [json.loads(l) for l in (run_dir/"metrics.jsonl").read_text().splitlines()]
    return ([(r["step"], r["loss"], r["grad_norm"]) for r in rows if r["split"] == "train"],
            [(r["step"], r["val_loss"]) for r in rows if r["split"] == "valid"])


def final_weights(run_dir):
    last = sorted((run_dir/"checkpoints").glob("step_*"))[-1]
    return last.name, load_file(last/"model.safetensors")


def last_logged_step(run_dir) -> int:
    "The last training step in metrics.jsonl (0 if none yet; tolerant of a line being written)."
    try: lines = (run_dir/"metrics.jsonl").read_text().splitlines()
    except FileNotFoundError: return 0
    steps = [0]
    for l in lines:
        try: r = json.loads(l)
        except json.JSONDecodeError: continue
        if r["split"] == "train": steps.append(r["step"])
    return max(steps)


def kill_when(proc, cond, timeout=120):
    "SIGKILL `proc` as soon as `cond()` holds; return whether it was killed (False: it finished first)."
    t0 = time.time()
    while proc.poll() is None:
        if cond() and proc.poll() is None: proc.send_signal(signal.SIGKILL); proc.wait(); return True
        if time.time() - t0 > timeout: proc.kill(); raise TimeoutError("the run neither finished nor reached the kill point")
        time.sleep(0.005)
    return False


def test_kill_and_resume_is_exact(data, tmp_path):
    out = tmp_path/"models"
    ref = subprocess.run(pretrain_cmd(*common(data, out, "ref")), env=env(), capture_output=True, text=True, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    ref_dir = run_dir_of(out, "ref")

    # 1. killed while a checkpoint is half-written (the writer sleeps between files)
    args = common(data, out, "crash")
    p = subprocess.Popen(pretrain_cmd(*args), env=env(delay=0.2), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck = lambda: out/"crash"
    def half_written():
        d = list(ck().glob("*/checkpoints"))
        return bool(d) and any((t/"model.safetensors").exists() for t in d[0].glob(".tmp_step_*")) and \
               any(s.name >= "step_00000008" for s in d[0].glob("step_*"))
    assert kill_when(p, half_written), "the run finished before it could be killed"
    run_dir = run_dir_of(out, "crash")
    tmps = list((run_dir/"checkpoints").glob(".tmp_*"))
    assert tmps and not (tmps[0]/"checkpoint.json").exists()  # the kill hit a checkpoint being written

    # 2..n: resume, killed again at random points of training (a few steps after the resume), until a resume finishes
    rng, finished, kills = random.Random(0), False, 1
    while not finished:
        base = int(sorted((run_dir/"checkpoints").glob("step_*"))[-1].name.split("_")[1])
        target = base + rng.randint(1, 7)
        p = subprocess.Popen(pretrain_cmd(*args, f"resume={run_dir}"), env=env(delay=rng.choice([0.0, 0.05])), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t_launch, m = time.time(), run_dir/"metrics.jsonl"
        fresh = lambda: m.exists() and m.stat().st_mtime > t_launch  # rewritten by this process (it truncates on resume)
        finished = kills >= 4 or not kill_when(p, lambda: fresh() and last_logged_step(run_dir) >= target)
        if finished: p.wait(); assert p.returncode == 0, p.stderr.read().decode()
        else: kills += 1
    assert kills >= 2

    assert train_losses(run_dir) == train_losses(ref_dir)  # losses, grad norms and validation losses at every step
    (n1, w1), (n2, w2) = final_weights(run_dir), final_weights(ref_dir)
    assert n1 == n2 == "step_00000048"
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [json.loads(l)["sample"] for l in (run_dir/"samples.jsonl").read_text().splitlines()] == \
           [json.loads(l)["sample"] for l in (ref_dir/"samples.jsonl").read_text().splitlines()]


def test_bad_resumes(data, tmp_path):
    out = tmp_path/"models"
    args = common(data, out, "r") + ["trainer.max_steps=12"]
    r = subprocess.run(pretrain_cmd(*args), env=env(), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = run_dir_of(out, "r")
    ckpts = sorted((run_dir/"checkpoints").glob("step_*"))
    assert [c.name for c in ckpts][-2:] == ["step_00000008", "step_00000012"]

    # a different model shape: a ConfigError (exit status 2), listing the differences
    r = subprocess.run(pretrain_cmd(f"resume={run_dir}", "model.emb_dim=64", "model.n_layers=3"), env=env(), capture_output=True, text=True)
    assert r.returncode == 2 and "model.emb_dim: 32 -> 64" in r.stderr and "model.n_layers: 2 -> 3" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

    # a truncated checkpoint: refused, naming the file; with resume_fallback the previous good one is used
    with open(ckpts[-1]/"optimizer.pt", "r+b") as f: f.truncate(50)
    r = subprocess.run(pretrain_cmd(f"resume={run_dir}"), env=env(), capture_output=True, text=True)
    assert r.returncode == 1 and "optimizer.pt" in r.stderr and "truncated" in r.stderr, r.stderr
    (ckpts[-1]/"checkpoint.json").write_text("{")  # a corrupt manifest too
    r = subprocess.run(pretrain_cmd(f"resume={ckpts[-1]}"), env=env(), capture_output=True, text=True)
    assert r.returncode == 1 and "checkpoint.json" in r.stderr, r.stderr
    r = subprocess.run(pretrain_cmd(f"resume={run_dir}", "trainer.resume_fallback=true", "trainer.max_steps=14"),
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Resuming" in r.stdout and "from step 8" in r.stdout, r.stdout
    assert sorted(c.name for c in (run_dir/"checkpoints").glob("step_*"))[-1] == "step_00000014"


class _Crash(Callback):
    "Simulate a kill (no end-of-fit checkpoint) at `event` of step `step`."
    order = 100  # after every default callback
    def __init__(self, event, step): self.event, self.at = event, step
    def _maybe(self, t):
        if t.step == self.at: raise KeyboardInterrupt
    def after_step(self, t):
        if self.event == "after_step": self._maybe(t)
    def after_epoch(self, t):
        if self.event == "after_epoch": self._maybe(t)


def _rows(run_dir, name):
    "The rows of a run's jsonl file, without the wall-clock fields."
    rows = [json.loads(l) for l in (run_dir/name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in rows]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("crash", [("after_step", 5), ("after_epoch", 0), ("after_step", 1)],
                         ids=["last-step-of-an-epoch", "after-epoch-callbacks", "first-step-of-next-epoch"])
def test_resume_at_an_epoch_end_is_exact(tmp_path, crash):
    "A checkpoint at the last step of an epoch: the resumed run logs, samples and ends exactly as an uninterrupted run."
    from llm_playground.checkpoint import list_checkpoints
    from llm_playground.config import seed_everything
    from llm_playground.dataloader import NextTokenPredictionDataset, create_dataloader
    from llm_playground.tokenizer import CharTokenizer
    from llm_playground.transformer import Transformer
    tok = CharTokenizer()
    ids = tok.encode(real_text())
    train_ds = NextTokenPredictionDataset(torch.tensor(ids[:8 * 16 * 5 + 1]).numpy(), max_length=16)
    valid_ds = NextTokenPredictionDataset(torch.tensor(ids[-400:]).numpy(), max_length=16)
    def run(run_dir, cbs=(), resume=False):
        run_dir.mkdir(exist_ok=True)
        seed_everything(0)
        dl = create_dataloader(train_ds, batch_size=8, seed=0, pin_memory=False)
        vdl = create_dataloader(valid_ds, batch_size=8, shuffle=False, drop_last=False, pin_memory=False)
        torch.manual_seed(0)
        m = Transformer(vocab_size=tok.vocab_size, context_length=16, emb_dim=32, n_layers=2, n_heads=2, drop_resid=0.1)
        cfg = dict(device="cpu", precision="fp32", num_epochs=3, log_steps=1, eval_steps=3, save_steps=len(dl), keep_last=10,
                   progress=False, plot=False, sampling=dict(prompts=["The"], max_new_tokens=4, show=False))
        t = Trainer(m, dl, vdl, cfg=cfg, tokenizer=tok, run_dir=run_dir, cbs=list(cbs))
        if resume: t.load_checkpoint(run_dir)
        return t.fit()
    ref = run(tmp_path/"ref")
    spe = ref.steps_per_epoch
    assert spe == 5 and ref.step == 15
    event, extra = crash
    crashed = tmp_path/"crash"
    with pytest.raises(KeyboardInterrupt): run(crashed, [_Crash(event, spe + extra)])
    # the latest checkpoint is the first epoch's end (one due at step 10 is written in after_epoch, not before it)
    assert list_checkpoints(crashed)[-1].name == f"step_{spe:08d}"
    resumed = run(crashed, resume=True)
    samples = _rows(crashed, "samples.jsonl")
    assert [r["step"] for r in samples] == [5, 10, 15]  # no duplicate of the epoch-end sample
    assert samples == _rows(tmp_path/"ref", "samples.jsonl")
    assert _rows(crashed, "metrics.jsonl") == _rows(tmp_path/"ref", "metrics.jsonl")  # losses, evaluations, counters
    assert all(torch.equal(a, b) for a, b in zip(ref.model.state_dict().values(), resumed.model.state_dict().values()))
    assert [p.name for p in list_checkpoints(crashed)] == [p.name for p in list_checkpoints(tmp_path/"ref")]
