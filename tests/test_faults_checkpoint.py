"""Checkpoint faults caused for real: hostile and damaged checkpoint files (also ones that pass their hashes), manifests
without a usable file list, a full disk and a read-only file system while a checkpoint is written, and a diverging run.
Each asserts the one-line message, the exception type (or exit status), and that nothing was lost or left behind."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import remount_readonly
from llm_playground.callbacks import MetricsCB
from llm_playground.checkpoint import (CheckpointCB, CheckpointError, CheckpointWriteError, CorruptCheckpointError, find_checkpoint,
                                       list_checkpoints, load_weights, prune_checkpoints, verify_checkpoint)
from llm_playground.dataloader import NextTokenPredictionDataset, create_dataloader
from llm_playground.tokenizer import CharTokenizer
from llm_playground.trainer import Callback, DivergenceError, Trainer, _append_line, loss_level
from llm_playground.transformer import Transformer
from llm_playground.utils import UserError, file_sha256

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"
FAST = dict(device="cpu", precision="fp32", progress=False, plot=False)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def dl():
    tok = CharTokenizer()
    ids = np.array(tok.encode(TEXT.read_text(encoding="utf-8")))
    return create_dataloader(NextTokenPredictionDataset(ids, max_length=16), batch_size=8, seed=0, pin_memory=False)


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(vocab_size=CharTokenizer().vocab_size, context_length=16, emb_dim=32, n_layers=2, n_heads=2)


def trainer(dl, run_dir=None, cbs=(), opt=None, **cfg):
    return Trainer(tiny(), dl, cfg={**FAST, **cfg}, opt_cfg=opt, run_dir=run_dir, cbs=list(cbs), default_cbs=False)


def one_line(e) -> str:
    "The message of `e`, which must be a single line without torch's or Python's noise."
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg and "weights_only" not in msg, msg
    return msg


def no_temp(d: Path):
    "Nothing half-written is left in the checkpoints folder of run `d`."
    assert not [p.name for p in (d/"checkpoints").iterdir() if p.name.startswith(".")], list((d/"checkpoints").iterdir())


@pytest.fixture(scope="module")
def run(dl, tmp_path_factory):
    "A run with checkpoints at steps 2 and 4 (copied by each test that damages one)."
    d = tmp_path_factory.mktemp("run")
    trainer(dl, d, [CheckpointCB(save_steps=2, keep_last=5)], max_steps=4).fit()
    assert [p.name for p in list_checkpoints(d)] == ["step_00000002", "step_00000004"]
    return d


def copy_run(run, tmp_path) -> tuple[Path, list[Path]]:
    d = tmp_path/"run"; shutil.copytree(run, d)
    return d, list_checkpoints(d)


def rehash(ckpt: Path):
    "Record the files' present sizes and hashes in checkpoint.json: a damage that verification cannot see."
    meta = json.loads((ckpt/"checkpoint.json").read_text())
    meta["files"] = {n: dict(sha256=file_sha256(ckpt/n), bytes=(ckpt/n).stat().st_size) for n in meta["files"]}
    (ckpt/"checkpoint.json").write_text(json.dumps(meta))


class _Evil:
    "A pickle that creates a file when it is loaded (if loading ever ran code)."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


# --- damaged or hostile files: one line naming the file; resume_fallback takes the previous checkpoint -------------------

def _hostile_state(c, tmp):
    st = torch.load(c/"state.pt", weights_only=True)
    torch.save({**st, "rng": _Evil(tmp/"PWNED")}, c/"state.pt")

def _hostile_optimizer(c, tmp): torch.save(_Evil(tmp/"PWNED"), c/"optimizer.pt")
def _garbage_weights(c, tmp): (c/"model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 3)
def _truncated_zip(c, tmp): (c/"optimizer.pt").write_bytes((c/"optimizer.pt").read_bytes()[:5000])
def _empty_state(c, tmp): (c/"state.pt").write_bytes(b"")
def _state_without_step(c, tmp):
    st = torch.load(c/"state.pt", weights_only=True); del st["step"]; torch.save(st, c/"state.pt")
def _state_wrong_type(c, tmp):
    st = torch.load(c/"state.pt", weights_only=True); torch.save({**st, "epoch": "zero"}, c/"state.pt")

DAMAGES = {  # name: (damage, the file named, words of the cause)
    "hostile-state.pt": (_hostile_state, "state.pt", "which is refused (loading it could run code)"),
    "hostile-optimizer.pt": (_hostile_optimizer, "optimizer.pt", "which is refused (loading it could run code)"),
    "garbage-safetensors": (_garbage_weights, "model.safetensors", "SafetensorError"),
    "truncated-zip": (_truncated_zip, "optimizer.pt", "cannot read"),
    "empty-state.pt": (_empty_state, "state.pt", "cannot read"),
    "state.pt-without-step": (_state_without_step, "state.pt", "has no entry 'step'"),
    "state.pt-wrong-type": (_state_wrong_type, "state.pt", "'epoch' is a str, expected a int"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_files_that_pass_their_hashes(dl, run, tmp_path, damage):
    "A file replaced together with its hash: verification passes, loading fails in one line, and fallback resumes step 2."
    d, ck = copy_run(run, tmp_path)
    fn, name, words = DAMAGES[damage]
    fn(ck[-1], tmp_path); rehash(ck[-1])
    verify_checkpoint(ck[-1])  # the hashes match: only reading it can tell
    with pytest.raises(CorruptCheckpointError) as e: trainer(dl, d).load_checkpoint(d)
    msg = one_line(e.value)
    assert str(ck[-1]/name) in msg and words in msg, msg
    t = trainer(dl, d, resume_fallback=True, max_steps=3)
    assert t.load_checkpoint(d) == ck[-2] and t.step == 2
    assert not (tmp_path/"PWNED").exists()  # the hostile pickle never ran
    t.fit()  # and the run continues from step 2
    assert t.step == 3


def test_hostile_pickle_never_runs_on_the_cli_path(run, tmp_path):
    "The same malicious pickle, loaded in a fresh process the way lp_pretrain resumes: refused, nothing executed."
    d, ck = copy_run(run, tmp_path)
    _hostile_state(ck[-1], tmp_path); rehash(ck[-1])
    code = ("import sys; from llm_playground.checkpoint import _torch_load; from pathlib import Path\n"
            "try: _torch_load(Path(sys.argv[1]), 'cpu')\nexcept Exception as e: print(type(e).__name__, e)")
    r = subprocess.run([sys.executable, "-c", code, str(ck[-1]/"state.pt")], capture_output=True, text=True)
    assert r.stdout.startswith("CorruptCheckpointError") and "weights_only" not in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert not (tmp_path/"PWNED").exists()
    torch.load(ck[-1]/"state.pt", weights_only=False)  # the control: loaded unsafely, the same file does run its command
    assert (tmp_path/"PWNED").exists()


def test_manifests_without_a_usable_file_list(run, tmp_path):
    "An empty, missing or malformed file list verifies nothing, so it fails; so does a resumable file left unlisted."
    d, ck = copy_run(run, tmp_path)
    good = json.loads((ck[-1]/"checkpoint.json").read_text())
    bad = [{}, {"files": {}}, {"files": []}, {"files": None}, {"files": {"../../model.safetensors": good["files"]["model.safetensors"]}},
           {**good, "files": {**good["files"], "state.pt": {"sha256": 1, "bytes": 1}}}]
    for meta in bad:
        (ck[-1]/"checkpoint.json").write_text(json.dumps(meta))
        with pytest.raises(CorruptCheckpointError, match="has no valid list of files"): verify_checkpoint(ck[-1])
    (ck[-1]/"checkpoint.json").write_text(json.dumps({**good, "val_loss": "low"}))
    with pytest.raises(CorruptCheckpointError, match="the val_loss in .* is not a number"): verify_checkpoint(ck[-1])
    (ck[-1]/"checkpoint.json").write_text(json.dumps({**good, "files": {k: v for k, v in good["files"].items() if k != "state.pt"}}))
    with pytest.raises(CorruptCheckpointError) as e: verify_checkpoint(ck[-1])
    assert one_line(e.value).endswith("does not list state.pt (needed to resume training).")
    verify_checkpoint(ck[-1], need=("model.safetensors",))  # enough for a reader of the weights
    assert find_checkpoint(d, fallback=True) == ck[-2]
    assert prune_checkpoints(d, keep_last=1, keep_best=True) == [ck[-1]]  # a bad manifest does not break pruning
    (ck[-1]/"checkpoint.json").write_text("{")
    assert prune_checkpoints(d, keep_last=1, keep_best=True) == [ck[-1]]


def test_find_checkpoint_need(run, tmp_path, capsys):
    "A reader of the weights verifies only them (and config.yaml): a damaged optimiser state does not stop sampling."
    d, ck = copy_run(run, tmp_path)
    with open(ck[-1]/"optimizer.pt", "r+b") as f: f.truncate(100)
    assert find_checkpoint(d, fallback=True, need=("model.safetensors",)) == ck[-1]
    assert capsys.readouterr().err == ""
    with open(ck[-1]/"model.safetensors", "r+b") as f: f.truncate(100)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors has 100 bytes"): find_checkpoint(d, need=("model.safetensors",))
    assert find_checkpoint(d, fallback=True, need=("model.safetensors",)) == ck[-2]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: Corrupt checkpoint") and f"Using {ck[-2]} instead" in err, err
    load_weights(tiny(1), ck[-2])
    (ck[-2]/"model.safetensors").write_bytes(b"x")
    with pytest.raises(CorruptCheckpointError, match="No good checkpoint to fall back to"): find_checkpoint(d, True, ("model.safetensors",))


# --- a checkpoint that cannot be written -----------------------------------------------------------------------------

class _At(Callback):
    "Run `fn(t)` after step `step` (after the checkpoint of that step)."
    order = 100
    def __init__(self, step, fn): self.step, self.fn = step, fn
    def after_step(self, t):
        if t.step == self.step: self.fn(t)


@pytest.mark.parametrize("first", [True, False], ids=["after-a-checkpoint", "first-checkpoint"])
def test_full_disk_while_writing_a_checkpoint(dl, small_fs, fill_fs, first):
    "The disk fills up half-way through a checkpoint: one line, no .tmp_step_* folder, the earlier checkpoint intact."
    d = small_fs("1m")
    fill_at = 2 if first else 1
    cbs = [MetricsCB(1), CheckpointCB(save_steps=2, keep_last=1), _At(fill_at, lambda t: fill_fs(d, leave=150_000))]
    with pytest.raises(CheckpointWriteError) as e: trainer(dl, d, cbs, max_steps=6).fit()
    msg = one_line(e.value)
    name = "step_00000004" if first else "step_00000002"
    assert msg.startswith(f"Cannot write checkpoint {name} in {d/'checkpoints'}: No space left on device."), msg
    assert e.value.errno == 28 and isinstance(e.value, OSError)
    assert type(e.value.__context__).__name__ in ("RuntimeError", "SafetensorError")  # it failed inside a file, half-way
    no_temp(d)
    if first:
        assert msg.endswith(f"The previous checkpoint step_00000002 is kept: free some space, then resume with lp_pretrain resume={d}.")
        assert [p.name for p in list_checkpoints(d)] == ["step_00000002"]  # not pruned for the one that failed
        verify_checkpoint(list_checkpoints(d)[0])
        (d/"ballast").unlink()  # free space, then resume as the message says
        t = trainer(dl, d, [MetricsCB(1), CheckpointCB(save_steps=2, keep_last=1)], max_steps=6)
        t.load_checkpoint(d); t.fit()
        assert t.step == 6 and [p.name for p in list_checkpoints(d)] == ["step_00000006"]
        assert [r["step"] for r in map(json.loads, (d/"metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4, 5, 6]
    else:
        assert msg.endswith("No earlier checkpoint was written: free some space, then start the run again.")
        assert list_checkpoints(d) == []


def test_read_only_file_system(dl, small_fs):
    "The file system turns read-only after the first checkpoint: one line, the checkpoint there stays good."
    d = small_fs("2m")
    with pytest.raises(CheckpointWriteError) as e:
        trainer(dl, d, [CheckpointCB(save_steps=2, keep_last=1), _At(2, lambda t: remount_readonly(d))], max_steps=6).fit()
    msg = one_line(e.value)
    assert msg == (f"Cannot write checkpoint step_00000004 in {d/'checkpoints'}: Read-only file system. The previous checkpoint "
                   f"step_00000002 is kept: make it writable (or copy the run to a writable disk), then resume with lp_pretrain resume={d}."), msg
    remount_readonly(d, False)
    no_temp(d)
    verify_checkpoint(find_checkpoint(d))


def test_metrics_row_on_a_full_disk(small_fs, fill_fs):
    "A row that does not fit: the OSError names the file, and the file is cut back (no half row for a resume to trip on)."
    d = small_fs("256k")
    p = d/"metrics.jsonl"
    _append_line(p, json.dumps(dict(step=1, loss=4.2)))
    before = p.read_bytes()
    fill_fs(d)
    with pytest.raises(OSError) as e: _append_line(p, json.dumps(dict(step=2, text="x" * 50_000)))
    assert e.value.errno == 28 and e.value.filename == str(p)
    assert p.read_bytes() == before


def test_cli_full_disk(small_fs, tmp_path):
    "lp_pretrain on a disk too small for a second checkpoint: exit 1, one line, the first checkpoint intact, nothing left over."
    d = small_fs("640k")
    r = subprocess.run([sys.executable, "-m", "llm_playground.cli", "pretrain", "experiment=smoke", f"dataset.train={TEXT}",
                        f"trainer.output_dir={d}", "trainer.device=cpu", "trainer.max_steps=8", "trainer.save_steps=4",
                        "trainer.plot=false", "trainer.sampling.show=false"],
                       capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    run_dir = next((d/"smoke").iterdir())
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == (f"lp_pretrain: error: Cannot write checkpoint step_00000008 in {run_dir/'checkpoints'}: No space left on device. "
                        f"The previous checkpoint step_00000004 is kept: free some space, then resume with lp_pretrain resume={run_dir}.\n")
    no_temp(run_dir)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004"]
    verify_checkpoint(list_checkpoints(run_dir)[0])


# --- divergence -------------------------------------------------------------------------------------------------------

def weights_max(ckpt: Path) -> float:
    return max(v.abs().max().item() for v in load_file(ckpt/"model.safetensors").values())


def test_lr_1e3_from_the_start(dl, tmp_path):
    "The issue's run (lr=1e3, a checkpoint every step, keep_last=2): stopped before any diverged checkpoint, saying there is none."
    log = MetricsCB(1)
    t = trainer(dl, tmp_path, [log, CheckpointCB(save_steps=1, keep_last=2, keep_best=False)], opt=dict(lr=1e3, warmup_steps=0), max_steps=30)
    with pytest.raises(DivergenceError) as e: t.fit()
    msg = one_line(e.value)
    assert isinstance(e.value, UserError) and "after step 1 have a loss of" in msg, msg
    assert msg.endswith("No checkpoint was written before it: start the run again with a lower optimiser.lr (now 1000), "
                        "or more warmup (optimiser.warmup_steps)."), msg
    assert list_checkpoints(tmp_path) == [] and not (tmp_path/"checkpoints").exists()


@pytest.mark.parametrize("save_steps, boost_at, kept", [(1, 5, ["step_00000004", "step_00000005"]), (3, 3, ["step_00000003"])],
                         ids=["caught-before-saving", "caught-at-the-next-step"])
def test_divergence_keeps_the_last_good_checkpoint(dl, tmp_path, save_steps, boost_at, kept):
    "A run that trains well, then diverges (lr 1e3 for one step): the good checkpoints stay and the error names the newest."
    def boost(t):
        for g in t.opt.param_groups: g["lr"] = 1e3
    t = trainer(dl, tmp_path, [CheckpointCB(save_steps=save_steps, keep_last=2, keep_best=False), _At(boost_at, boost)], max_steps=30)
    with pytest.raises(DivergenceError) as e: t.fit()
    msg = one_line(e.value)
    good = tmp_path/"checkpoints"/kept[-1]
    assert [p.name for p in list_checkpoints(tmp_path)] == kept
    assert all(weights_max(p) < 10 for p in list_checkpoints(tmp_path))  # no diverged weights were saved
    assert f"the last good one is {good}: resume from it with a lower optimiser.lr (now 0.0006)" in msg, msg
    assert msg.endswith(f"e.g. lp_pretrain resume={good} optimiser.lr=6e-05."), msg
    no_temp(tmp_path)
    r = trainer(dl, tmp_path, [CheckpointCB(save_steps=save_steps, keep_last=2)], opt=dict(lr=6e-5), max_steps=12)
    r.load_checkpoint(good); r.fit()  # the advice works
    assert r.step == 12 and weights_max(list_checkpoints(tmp_path)[-1]) < 10


def test_normal_runs_do_not_trip_the_guard(dl):
    "100 steps at the smoke preset's learning rate and at 10x the default, with warmup: the loss never nears 4x its level."
    class _Ratio(Callback):
        def before_fit(self, t): self.worst = 0.0
        def before_step(self, t): self.level = loss_level(t.recent_losses)
        def after_step(self, t):
            if self.level: self.worst = max(self.worst, t.loss.item() / self.level)
    for lr in (3e-3, 6e-3):
        ratio = _Ratio()
        t = trainer(dl, cbs=[ratio], opt=dict(lr=lr, warmup_steps=10), max_steps=100).fit()
        assert t.step == 100 and ratio.worst < 1.5, (lr, ratio.worst)
