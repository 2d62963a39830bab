"""Real `torchrun` with 2 CPU processes (gloo): two processes train as one with the same global batch, a run killed
(one rank, then all) resumes bit for bit at 2 processes, and a 2-process run continues on 1 process at the same data
position. The console script is started as users start it: `torchrun --standalone --nproc_per_node=2 $(which lp_pretrain)`."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_resume import data  # noqa: F401  (the fixture: a few KB of real prose, split 90/10 into train.txt and valid.txt)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")


def common(data, out, name, steps=24):
    return ["experiment=smoke", f"dataset.train={data/'train.txt'}", f"dataset.validation={data/'valid.txt'}",
            "dataset.max_length=16", "dataset.seed=3", f"trainer.output_dir={out}", f"trainer.experiment_name={name}",
            "trainer.device=cpu", "trainer.precision=fp32", f"trainer.max_steps={steps}", "trainer.save_steps=4",
            "trainer.log_steps=1", "trainer.eval_steps=8", "trainer.eval_max_batches=3", "trainer.keep_last=20",
            "trainer.grad_accum_steps=2", "trainer.sampling.every_n_steps=8", "trainer.sampling.show=false"]


def lp_pretrain() -> str:
    exe = shutil.which("lp_pretrain")
    if exe is None: pytest.skip("the lp_pretrain console script is not on PATH (pip install -e . and activate the venv)")
    return exe


def torchrun(n: int, *args) -> list[str]:
    "The command a user types: torchrun --standalone --nproc_per_node=n $(which lp_pretrain) args (torchrun as a module of this Python)."
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", lp_pretrain(), *args]


def one_process(*args) -> list[str]: return [sys.executable, lp_pretrain(), *args]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(cmd, cwd):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_dir_of(out, name) -> Path:
    dirs = sorted((Path(out)/name).glob("*_seed_*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def rows(run_dir, split="train"):
    return [json.loads(l) for l in (run_dir/"metrics.jsonl").read_text().splitlines() if json.loads(l)["split"] == split]


def curve(run_dir): return [(r["step"], r["loss"], r["grad_norm"]) for r in rows(run_dir)]


def weights(ckpt): return load_file(ckpt/"model.safetensors")


def close(a, b, tol=1e-4): return len(a) == len(b) and all(x[0] == y[0] and abs(x[1] - y[1]) <= tol for x, y in zip(a, b))


@pytest.fixture(scope="module")
def two_and_one(data, tmp_path_factory):
    "A 2-process run (batch 4 per process) and a 1-process run (batch 8): the same global batch of 16 windows per step."
    tmp = tmp_path_factory.mktemp("runs"); out = tmp/"models"
    two = run(torchrun(2, *common(data, out, "two"), "dataset.batch_size=4"), tmp)
    one = run(one_process(*common(data, out, "one"), "dataset.batch_size=8"), tmp)
    return tmp, run_dir_of(out, "two"), run_dir_of(out, "one"), two


def test_two_processes_train_as_one(two_and_one):
    tmp, two, one, proc = two_and_one
    assert "x 2 processes (ddp)" in proc.stdout and proc.stdout.count("Run directory:") == 2  # one speaker (start and end lines)
    c2, c1 = curve(two), curve(one)
    assert [s for s, *_ in c2] == list(range(1, 25))  # one writer: every step once
    assert close(c2, c1), list(zip(c2, c1))[:5]
    assert all(abs(a[2] - b[2]) <= 1e-4 for a, b in zip(c2, c1))  # gradient norms too
    v2, v1 = rows(two, "valid"), rows(one, "valid")
    assert [r["step"] for r in v2] == [r["step"] for r in v1] and all(abs(a["val_loss"] - b["val_loss"]) <= 1e-4 for a, b in zip(v2, v1))
    assert len((two/"samples.jsonl").read_text().splitlines()) == len((one/"samples.jsonl").read_text().splitlines())
    w2, w1 = weights(two/"checkpoints/step_00000024"), weights(one/"checkpoints/step_00000024")
    assert all(torch.allclose(w2[k], w1[k], atol=1e-4) for k in w1)


def test_two_process_run_continues_on_one_process(two_and_one):
    "Resumed on 1 process (batch 8: the same global batch), it trains on the same windows: the losses of the 2-process run."
    tmp, two, one, _ = two_and_one
    copy = tmp/"continued"; shutil.copytree(two, copy)
    r = subprocess.run(one_process(f"resume={copy/'checkpoints/step_00000008'}"), env=ENV, capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr  # batch 4 on 1 process: another global batch, refused in one line
    assert "16 windows per optimiser step" in r.stderr and "dataset.batch_size=8" in r.stderr
    run(one_process(f"resume={copy/'checkpoints/step_00000008'}", "dataset.batch_size=8"), tmp)
    assert close(curve(copy), curve(two))  # steps 1-8 kept, 9-24 retrained on one process: the same windows, the same losses
    w, ref = weights(copy/"checkpoints/step_00000024"), weights(two/"checkpoints/step_00000024")
    assert all(torch.allclose(w[k], ref[k], atol=1e-4) for k in ref)


def children(pid: int) -> list[int]:
    "The pids of the child processes of `pid` (torchrun's workers)."
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_at(proc, run_dir_glob, step: int, one_rank: bool, timeout=300):
    "SIGKILL one worker (or torchrun and all its workers) once a checkpoint of `step` or later exists."
    t0 = time.time()
    while proc.poll() is None:
        cks = [p.name for d in run_dir_glob() for p in (d/"checkpoints").glob("step_*")]
        if cks and max(cks) >= f"step_{step:08d}":
            workers = children(proc.pid)
            for pid in (workers[:1] if one_rank else [*workers, proc.pid]):
                try: os.kill(pid, signal.SIGKILL)
                except ProcessLookupError: pass
            proc.wait(timeout=120); return True
        if time.time() - t0 > timeout: proc.kill(); raise TimeoutError("the run neither finished nor reached the kill point")
        time.sleep(0.01)
    return False


def test_kill_and_resume_two_processes_is_exact(data, tmp_path):
    "Dropout on (each rank its own masks, so every rank's random state must come back): killed twice, resumed, bit for bit."
    out, drop = tmp_path/"models", ["dataset.batch_size=4", "model.drop_resid=0.1", "model.drop_attn=0.1"]
    run(torchrun(2, *common(data, out, "ref"), *drop), tmp_path)
    ref = run_dir_of(out, "ref")
    args = [*common(data, out, "crash"), *drop]
    glob = lambda: list((out/"crash").glob("*_seed_*"))
    p = subprocess.Popen(torchrun(2, *args), env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_at(p, glob, 8, one_rank=True), "the run finished before it could be killed"
    crash = run_dir_of(out, "crash")
    p = subprocess.Popen(torchrun(2, *args, f"resume={crash}"), env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = kill_at(p, glob, 16, one_rank=False)
    if killed: run(torchrun(2, *args, f"resume={crash}"), tmp_path)
    else: assert p.returncode == 0
    assert curve(crash) == curve(ref)  # every step's loss and gradient norm, exactly
    assert [r["val_loss"] for r in rows(crash, "valid")] == [r["val_loss"] for r in rows(ref, "valid")]
    w, w_ref = weights(crash/"checkpoints/step_00000024"), weights(ref/"checkpoints/step_00000024")
    assert w.keys() == w_ref.keys() and all(torch.equal(w[k], w_ref[k]) for k in w)


def test_fsdp_trains_as_one_and_resumes(data, two_and_one, tmp_path):
    """FSDP2 on gloo (CPU): the same curve as one process; killed (all ranks) after a checkpoint and resumed, bit for bit;
    its checkpoint (gathered into one safetensors file) continues on one process without FSDP."""
    _, _, one, _ = two_and_one
    out, fsdp = tmp_path/"models", ["dataset.batch_size=4", "trainer.distributed=fsdp"]
    proc = run(torchrun(2, *common(data, out, "fsdp"), *fsdp), tmp_path)
    assert "x 2 processes (fsdp)" in proc.stdout
    ref = run_dir_of(out, "fsdp")
    assert close(curve(ref), curve(one))
    assert len((ref/"samples.jsonl").read_text().splitlines()) == len((one/"samples.jsonl").read_text().splitlines())  # sampled from the gathered model
    w, w1 = weights(ref/"checkpoints/step_00000024"), weights(one/"checkpoints/step_00000024")
    assert w.keys() == w1.keys() and all(torch.allclose(w[k], w1[k], atol=1e-4) for k in w1)  # the same file layout as one process writes

    args = [*common(data, out, "fsdp_crash"), *fsdp]
    p = subprocess.Popen(torchrun(2, *args), env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_at(p, lambda: list((out/"fsdp_crash").glob("*_seed_*")), 8, one_rank=False), "the run finished before it could be killed"
    crash = run_dir_of(out, "fsdp_crash")
    run(torchrun(2, *args, f"resume={crash}"), tmp_path)
    assert curve(crash) == curve(ref)
    w2 = weights(crash/"checkpoints/step_00000024")
    assert all(torch.equal(w2[k], w[k]) for k in w)

    copy = tmp_path/"fsdp_on_one"; shutil.copytree(ref, copy)
    run(one_process(f"resume={copy/'checkpoints/step_00000012'}", "dataset.batch_size=8", "trainer.distributed=ddp"), tmp_path)
    assert close(curve(copy), curve(ref))


def test_fsdp_refuses_muon_in_one_line(data, tmp_path):
    r = subprocess.run(torchrun(2, *common(data, tmp_path/"m", "x", steps=2), "dataset.batch_size=4", "trainer.distributed=fsdp",
                                "optimiser=muon"), env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "lp_pretrain: error: trainer.distributed=fsdp cannot use optimiser.name=muon" in r.stderr
    assert not list((tmp_path/"m").glob("x/*"))  # refused before any run directory was made


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 CUDA GPUs (one per process)")
def test_two_gpus_train_as_one(data, tmp_path):
    "On CUDA the backend is NCCL, each rank on the GPU of its LOCAL_RANK; fp32 so the curves compare."
    out = tmp_path/"models"
    on_gpu = lambda name: [a.replace("trainer.device=cpu", "trainer.device=cuda") for a in common(data, out, name)]
    run(torchrun(2, *on_gpu("two"), "dataset.batch_size=4"), tmp_path)
    run(one_process(*on_gpu("one"), "dataset.batch_size=8"), tmp_path)
    assert close(curve(run_dir_of(out, "two")), curve(run_dir_of(out, "one")), tol=1e-3)


def test_resume_with_the_global_batch_split_differently(data, tmp_path):
    "Same global batch, split as 4 x 4 micro-batches instead of 8 x 2: the resumed run sees the same windows, across an epoch end."
    out, small = tmp_path/"models", tmp_path/"small.txt"
    small.write_text((data/"train.txt").read_text()[:3000])  # ~190 windows: an epoch is 12 steps of 16 windows
    args = [a.replace(str(data/"train.txt"), str(small)) for a in common(data, out, "split", steps=20)]
    run(one_process(*args, "dataset.batch_size=8"), tmp_path)
    ref = run_dir_of(out, "split"); copy = tmp_path/"resplit"; shutil.copytree(ref, copy)
    run(one_process(f"resume={copy/'checkpoints/step_00000004'}", "dataset.batch_size=4", "trainer.grad_accum_steps=4"), tmp_path)
    assert close(curve(copy), curve(ref), tol=1e-5)
    assert max(r["epoch"] for r in rows(ref)) >= 1  # the run crossed an epoch end


def test_fsdp_sampling_leaves_training_alone(data, tmp_path):
    "Sampling gathers a plain copy of the model; building it must not draw from the training's random numbers (dropout on)."
    out, base = tmp_path/"models", ["dataset.batch_size=4", "trainer.distributed=fsdp", "model.drop_resid=0.1"]
    for name, every in (("sampled", 3), ("quiet", 0)):
        run(torchrun(2, *[a for a in common(data, out, name, steps=8) if not a.startswith("trainer.sampling.every_n_steps")],
                     *base, f"trainer.sampling.every_n_steps={every}", "trainer.sampling.every_epoch=false"), tmp_path)
    assert len((run_dir_of(out, "sampled")/"samples.jsonl").read_text().splitlines()) > 0
    assert curve(run_dir_of(out, "sampled")) == curve(run_dir_of(out, "quiet"))
