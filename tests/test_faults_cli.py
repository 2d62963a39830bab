"""Faults at the command line, caused for real: a read-only or full file system under the run directory, a second
process writing the same run, settings that cannot work, bad sampling options, output redirected to a log.
Each test checks the one-line message, the exit status, and that nothing was lost or left behind."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest

from conftest import remount_readonly, sigint_default
from llm_playground.checkpoint import list_checkpoints, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"


def run(*args, cwd=None, timeout=120, **env):
    "Run a console script through `python -m llm_playground.cli` (the same entry points as the installed `lp_*`)."
    return subprocess.run([sys.executable, "-m", "llm_playground.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1", **env))


def pretrain(out: Path, *extra, **kw):
    "A few steps of the smoke experiment (a 2-layer model on characters) into `out`."
    return run("pretrain", "experiment=smoke", f"dataset.train={TEXT}", f"trainer.output_dir={out}", "trainer.device=cpu",
               "trainer.max_steps=4", "trainer.save_steps=2", "trainer.sampling.prompts=[]", *extra, **kw)


def one_error_line(r, prog="lp_pretrain") -> str:
    "The single line of stderr of a failed command: `prog: error: ...` (no traceback, nothing else)."
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), r.stderr
    return lines[0]


def files_under(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in Path(d).rglob("*"))


def test_read_only_output_dir(small_fs):
    d = small_fs("4m"); remount_readonly(d)
    r = pretrain(d/"models")
    assert r.returncode == 1
    line = one_error_line(r)
    assert f"Read-only file system: {d/'models'}" in line and "choose a writable folder" in line, line
    remount_readonly(d, False)
    assert files_under(d) == []


def test_full_disk_leaves_no_stub_run_dir(small_fs, fill_fs):
    d = small_fs("1m"); fill_fs(d)
    before = files_under(d)
    r = pretrain(d/"models")
    assert r.returncode == 1
    assert "No space left on device" in one_error_line(r)
    assert files_under(d) == before   # no run directory, nor the experiment and output folders made for it


def test_output_dir_under_a_file(tmp_path):
    (tmp_path/"afile").write_text("x")
    r = pretrain(tmp_path/"afile"/"models")
    assert r.returncode == 1
    assert "Not a directory" in one_error_line(r) and str(tmp_path/"afile") in r.stderr


@pytest.mark.parametrize("bad, says", [("optimiser.lr=nan", "Config key 'optimiser.lr' must be a finite number, got nan."),
                                       ("optimiser.weight_decay=inf", "'optimiser.weight_decay' must be a finite number, got inf"),
                                       ("optimiser.lr=-1", "Config key 'optimiser.lr' must be > 0, got -1.0."),
                                       ("optimiser.betas=[2,0.9]", "'optimiser.betas' must be in [0, 1), got [2.0, 0.9]"),
                                       ("trainer.grad_accum_steps=0", "'trainer.grad_accum_steps' must be >= 1, got 0"),
                                       ("trainer.max_steps=-3", "'trainer.max_steps' must be >= 1, got -3"),
                                       ("trainer.max_time=0", "'trainer.max_time' must be > 0, got 0.0"),
                                       ("trainer.sampling.top_p=0", "'trainer.sampling.top_p' must be in (0, 1], got 0.0")])
def test_bad_number_named_by_key(tmp_path, bad, says):
    r = pretrain(tmp_path/"models", bad)
    assert r.returncode == 2
    assert says in one_error_line(r)
    assert not (tmp_path/"models").exists()   # nothing created


@pytest.mark.parametrize("prog, args", [("corpus", ["corpus.num_shardz=1"]), ("preprocess", ["preprocessing.num_threadz=1"]),
                                        ("pretrain", ["trainer.num_epochz=3"]), ("sample", ["temperatur=1"])])
def test_unknown_key_without_plus_advice(tmp_path, prog, args):
    r = run(prog, *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r, f"lp_{prog}")
    assert "Unknown config key" in line and "Did you mean" in line and "+" not in line, line


@pytest.mark.parametrize("bad, says", [("temperature=-1", "'temperature' must be >= 0, got -1.0"), ("top_k=0", "'top_k' must be >= 1"),
                                       ("top_p=2", "'top_p' must be in (0, 1], got 2.0"), ("max_new_tokens=-1", "'max_new_tokens' must be >= 0")])
def test_sample_options_checked_before_anything(tmp_path, bad, says):
    r = run("sample", f"checkpoint={tmp_path}/nowhere", "prompt=Hi", bad)
    assert r.returncode == 2
    assert says in one_error_line(r, "lp_sample")
    assert r.stdout == ""   # the prompt was not echoed


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    "A finished 4-step run (checkpoints at steps 2 and 4)."
    out = tmp_path_factory.mktemp("faults_cli")/"models"
    r = pretrain(out)
    assert r.returncode == 0, r.stderr
    return next(out.glob("smoke/*"))


def test_log_gets_plain_progress_lines(tmp_path):
    r = pretrain(tmp_path/"models", "trainer.progress=true", "trainer.log_steps=2")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stdout + r.stderr
    assert [l.split(":")[0] for l in r.stdout.splitlines() if l.startswith("step ") and "/" in l.split(":")[0]] == ["step 2/4", "step 4/4"]


def _wait_for(cond, timeout=60.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout: raise TimeoutError
        time.sleep(0.1)


def test_one_writer_per_run(small_run):
    "A second `lp_pretrain resume=` of a run in use is refused; after the first is killed, the run resumes."
    metrics = small_run/"metrics.jsonl"
    first = subprocess.Popen([sys.executable, "-m", "llm_playground.cli", "pretrain", f"resume={small_run}", "trainer.max_steps=100000",
                              "trainer.save_steps=0", "trainer.log_steps=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        _wait_for(lambda: metrics.exists() and any(json.loads(l)["step"] > 4 for l in metrics.read_text().splitlines() if l.strip()))
        second = run("pretrain", f"resume={small_run}", "trainer.max_steps=6")
        assert second.returncode == 1
        line = one_error_line(second)
        assert f"{small_run} is in use by process {first.pid} (lp_pretrain)" in line, line
    finally:
        first.send_signal(signal.SIGKILL); first.wait()
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip()]
    assert len(steps) == len(set(steps))   # one writer: no row written twice
    # the killed process's lock is gone with it: the run resumes from its last checkpoint (step 4), trimming the rows after it
    third = run("pretrain", f"resume={small_run}", "trainer.max_steps=6")
    assert third.returncode == 0, third.stderr
    assert "from step 4" in third.stdout
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip() and json.loads(l)["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    for c in list_checkpoints(small_run): verify_checkpoint(c)


def test_sample_from_a_damaged_run(small_run, tmp_path):
    "lp_sample reads only the weights: damaged optimiser state is ignored, damaged weights fall back to the checkpoint before."
    import shutil
    run_dir = tmp_path/"run"; shutil.copytree(small_run, run_dir)
    newest = list_checkpoints(run_dir)[-1]
    args = ("sample", f"checkpoint={run_dir}", "prompt=It is", "max_new_tokens=5", "temperature=0", "device=cpu")
    with open(newest/"optimizer.pt", "r+b") as f: f.write(b"garbage")
    r = run(*args)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    with open(newest/"model.safetensors", "r+b") as f: f.seek(200); f.write(b"\xff" * 16)
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("It is")
    warning = r.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning:") and f"Using {list_checkpoints(run_dir)[-2]}" in warning[0], r.stderr
    for c in list_checkpoints(run_dir)[:-1]: shutil.rmtree(c)
    r = run(*args)
    assert r.returncode == 1 and "No good checkpoint to fall back to" in one_error_line(r, "lp_sample")


def _start(*args):
    "The CLI as a child process (faulthandler on: `_interrupt` makes a hung one print where each of its threads is)."
    return subprocess.Popen([sys.executable, "-m", "llm_playground.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"), preexec_fn=sigint_default)


def _interrupt(p, timeout=60) -> str:
    "Ctrl-C `p` and return its stderr; if it has not exited after `timeout` s, abort it and fail with its threads' tracebacks."
    p.send_signal(signal.SIGINT)
    try: return p.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT); err = p.communicate()[1]
        pytest.fail(f"still running {timeout} s after Ctrl-C; its threads:\n{err[-6000:]}")


def test_ctrl_c_says_what_was_kept(tmp_path):
    "Ctrl-C before the first checkpoint removes the new run (and says so); after one, keeps it and says how to resume."
    args = ("pretrain", "experiment=smoke", f"dataset.train={TEXT}", "trainer.device=cpu", "trainer.max_steps=100000",
            "trainer.sampling.prompts=[]", "trainer.log_steps=1")
    p = _start(*args, f"trainer.output_dir={tmp_path/'a'}", "trainer.save_steps=0")
    _wait_for(lambda: any((tmp_path/"a").glob("smoke/*/metrics.jsonl")))
    err = _interrupt(p)
    assert p.returncode == 130
    run_dir = err.split("so the new run directory ")[-1].split(" was removed")[0]
    assert err.strip().splitlines()[-1] == f"lp_pretrain: interrupted. No checkpoint was written yet, so the new run directory {run_dir} was removed."
    assert not (tmp_path/"a").exists()   # the run, its experiment folder and the output folder made for it
    p = _start(*args, f"trainer.output_dir={tmp_path/'b'}", "trainer.save_steps=2")
    _wait_for(lambda: any((tmp_path/"b").glob("smoke/*/checkpoints/step_*/checkpoint.json")))
    err = _interrupt(p)
    assert p.returncode == 130 and "continue with lp_pretrain resume=latest" in err.strip().splitlines()[-1], err
    run_dir = next((tmp_path/"b").glob("smoke/*"))
    for c in list_checkpoints(run_dir): verify_checkpoint(c)
    assert not [q for q in (run_dir/"checkpoints").iterdir() if q.name.startswith(".tmp")]


def test_damaged_run_config(small_run, tmp_path):
    "A run-directory config.yaml (covered by no checksum) that does not parse is a damaged checkpoint, in one line."
    import shutil
    run_dir = tmp_path/"run"; shutil.copytree(small_run, run_dir)
    for c in list_checkpoints(run_dir):   # checkpoints written without their own config (as a Python Trainer writes them)
        (c/"config.yaml").unlink()
        meta = json.loads((c/"checkpoint.json").read_text()); meta["files"].pop("config.yaml"); (c/"checkpoint.json").write_text(json.dumps(meta))
    (run_dir/"config.yaml").write_text("model: [unclosed\n")
    r = run("sample", f"checkpoint={run_dir}", "prompt=It", "max_new_tokens=2", "device=cpu")
    assert r.returncode == 1 and "Corrupt run config: cannot read" in one_error_line(r, "lp_sample")
    r = run("pretrain", f"resume={run_dir}", "trainer.max_steps=6")
    assert r.returncode == 1 and "Corrupt run config" in one_error_line(r)


def test_plot_on_a_full_disk(small_fs, fill_fs):
    "loss.png is rendered in memory and written atomically: a full disk names the file and leaves no broken plot."
    from llm_playground.callbacks import plot_metrics
    d = small_fs("1m"); (d/"loss.png").write_bytes(b"old plot"); fill_fs(d)
    rows = [dict(split="train", step=i, loss=5.0 / i, lr=1e-3) for i in range(1, 50)]
    with pytest.raises(OSError) as e: plot_metrics(rows, d/"loss.png", show=False)
    assert e.value.filename == str(d/"loss.png") and e.value.errno == 28
    assert (d/"loss.png").read_bytes() == b"old plot" and sorted(p.name for p in d.iterdir()) == ["ballast", "loss.png"]
