"""Real faults on the data side (issue 8): a full disk and a read-only out_dir for lp_preprocess, two concurrent writers,
data tokenized by another tokenizer, ids out of range, single-line and tiny shards, broken and looping links.
Each test causes the fault for real and checks the one-line message, the exit code (CLI through a subprocess for the
key cases, the Python API for the rest), and that nothing was lost or left behind."""
import json, os, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest

from conftest import remount_readonly
from llm_playground.dataloader import check_tokens, dataloaders_from_config
from llm_playground.preprocess import PreprocessError, load_manifest, preprocess
from llm_playground.tokenizer import CharTokenizer, GPT2Tokenizer
from llm_playground.utils import DataError, LockError


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    "lp_preprocess as a user runs it (the installed script, else its entry point), with Hydra overrides `args`."
    exe = Path(sys.executable).parent/"lp_preprocess"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from llm_playground.preprocess import main; main()"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})

def one_line_error(r: subprocess.CompletedProcess, *needles, status: int = 1):
    "Exit `status`, and stderr is exactly one `lp_preprocess: error:` line holding every needle (no traceback)."
    assert r.returncode == status, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lp_preprocess: error: "), r.stderr
    for n in needles: assert n in lines[0], lines[0]

def snapshot(d: Path) -> dict:
    "Every file under `d` but the lock file: relative path -> bytes."
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}

def temp_files(d: Path) -> list: return [p for p in Path(d).rglob("*") if p.name.endswith(".tmp")]

def paragraphs(n: int, word: str = "text") -> str: return "\n\n".join(f"Paragraph {i} holds some {word} to learn from." for i in range(n))

@pytest.fixture
def raw(tmp_path) -> Path:
    "A small input folder: a short shard and a longer one."
    d = tmp_path/"raw"; d.mkdir()
    (d/"a.txt").write_text(paragraphs(40)); (d/"b.txt").write_text(paragraphs(4000, "other words"))
    return d

def run_args(raw: Path, out: Path, *more) -> list[str]:
    return [f"input_dir={raw}", f"out_dir={out}", "preprocessing.progress=false", *more]


# --- disk full, read-only: one line naming path and cause; the earlier output intact; nothing left behind ------------

def test_readonly_out_dir_keeps_earlier_output(raw, small_fs):
    fs = small_fs("4m"); out = fs/"out"
    preprocess(raw, out, progress=False, verbose=False)
    before = snapshot(out)
    remount_readonly(fs)
    try:
        r = cli(*run_args(raw, out, "preprocessing.seed=7"))        # other settings: everything would be rewritten
        one_line_error(r, str(out), "Read-only file system")
        assert snapshot(out) == before
        ok = cli(*run_args(raw, out))                                # unchanged: nothing to write, so no lock needed
        assert ok.returncode == 0 and "nothing to do" in ok.stdout, ok.stderr
    finally: remount_readonly(fs, False)
    assert temp_files(fs) == [] and load_manifest(out)["seed"] == 1337


def test_full_disk_keeps_earlier_output(raw, small_fs, fill_fs):
    fs = small_fs("2m"); out = fs/"out"
    preprocess(raw, out, progress=False, verbose=False)
    before = snapshot(out)
    fill_fs(fs)
    r = cli(*run_args(raw, out, "preprocessing.force=true"))
    one_line_error(r, "No space left on device", str(out/"train"))
    assert snapshot(out) == before and temp_files(fs) == []


def test_full_disk_midway_lists_only_complete_shards(raw, small_fs, fill_fs):
    "The short shard fits, the long one does not: the manifest lists the one written, and the loaders refuse the stale file."
    fs = small_fs("2m"); out = fs/"out"
    preprocess(raw, out, progress=False, verbose=False)
    old_b = (out/"train"/"b.bin").read_bytes()
    fill_fs(fs, leave=160_000)
    with pytest.raises(PreprocessError, match="Could not write the outputs of b.txt .*No space left on device"):
        preprocess(raw, out, seed=7, progress=False, verbose=False)
    m = load_manifest(out)
    assert (m["seed"], list(m["shards"])) == (7, ["a"])                       # a.txt's new outputs are complete and listed
    assert (out/"train"/"b.bin").read_bytes() == old_b and temp_files(fs) == []   # b.txt's old files untouched, no temp files
    with pytest.raises(DataError, match="b.bin is not listed in"): check_tokens(out/"train", GPT2Tokenizer())


def test_full_disk_fresh_out_dir_leaves_no_stub(raw, small_fs, fill_fs):
    fs = small_fs("1m"); fill_fs(fs)
    r = cli(*run_args(raw, fs/"new"/"out"))
    one_line_error(r, "No space left on device")
    assert not (fs/"new"/"out").exists() and temp_files(fs) == []


def test_bad_input_creates_nothing(tmp_path):
    out = tmp_path/"out"
    cases = {"empty": {}, "latin1": {"x.txt": "café".encode("latin-1")}, "blank": {"x.txt": b"\n \n"},
             "tiny": {"x.txt": b"x"}, "not_txt": {"x.md": b"hello"}}
    for name, files in cases.items():
        d = tmp_path/name; d.mkdir()
        for f, data in files.items(): (d/f).write_bytes(data)
        with pytest.raises(PreprocessError): preprocess(d, out, progress=False, verbose=False)
        assert not out.exists(), name
    r = cli(*run_args(tmp_path/"latin1", out))
    one_line_error(r, "x.txt: invalid UTF-8 at byte offset 3")
    assert not out.exists()


# --- one writer per out_dir: two real processes --------------------------------------------------------------------

SLOW_WRITER = """
import os, sys, time
from llm_playground.preprocess import preprocess
from llm_playground.tokenizer import CharTokenizer
class Slow(CharTokenizer):
    slept = False
    def encode_batch(self, texts, num_threads=1):
        if not self.slept:  # hold the folder for argv[3] seconds, or until the file argv[4] appears
            print("encoding", flush=True); t0 = time.time()
            while time.time() - t0 < float(sys.argv[3]) and not (len(sys.argv) > 4 and os.path.exists(sys.argv[4])): time.sleep(0.05)
            self.slept = True
        return super().encode_batch(texts, num_threads)
preprocess(sys.argv[1], sys.argv[2], tokenizer=Slow(), progress=False, verbose=False)
print("done", flush=True)
"""

def slow_writer(raw: Path, out: Path, sleep: float, go: Path | None = None) -> subprocess.Popen:
    "A real preprocessing process that holds `out` while it encodes slowly (until `go` exists, if given); returns once it is encoding."
    p = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(raw), str(out), str(sleep), *([str(go)] if go else [])],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "encoding"
    return p

def test_second_writer_refused(raw, tmp_path):
    out = tmp_path/"out"
    go = tmp_path/"go"
    first = slow_writer(raw, out, 120, go)  # it holds the folder until the second writer has been refused (however slow its start)
    try:
        r = cli(*run_args(raw, out)); go.touch()
        one_line_error(r, f"{out} is in use by process {first.pid} (lp_preprocess)", "wait for it to finish")
        assert first.stdout.read().strip() == "done" and first.wait(30) == 0
    finally: first.kill(); first.stdout.close()
    m = load_manifest(out)                                           # the first run's output is complete and intact
    assert m["tokenizer"] == "char" and sorted(m["shards"]) == ["a", "b"] and temp_files(out) == []
    check_tokens(out/"train", CharTokenizer())


def test_killed_writer_leaves_no_stale_lock(raw, tmp_path):
    out = tmp_path/"out"
    first = slow_writer(raw, out, 30)
    first.kill(); first.wait(); first.stdout.close()                  # SIGKILL while it holds the lock
    m = preprocess(raw, out, tokenizer=CharTokenizer(), progress=False, verbose=False)
    assert sorted(m["shards"]) == ["a", "b"] and temp_files(out) == []


# --- every input checked against the tokenizer before training ----------------------------------------------------

@pytest.fixture(scope="module")
def both(tmp_path_factory):
    "The same text preprocessed with GPT-2 and with the character tokenizer."
    tmp = tmp_path_factory.mktemp("both"); (tmp/"raw").mkdir()
    (tmp/"raw"/"a.txt").write_text(paragraphs(300))
    preprocess(tmp/"raw", tmp/"gpt2", progress=False, verbose=False)
    preprocess(tmp/"raw", tmp/"char", tokenizer=CharTokenizer(), progress=False, verbose=False)
    return tmp

def loaders(train, validation, tok):
    return dataloaders_from_config({"train": str(train), "validation": str(validation), "max_length": 16, "batch_size": 2}, tok)

def test_gpt2_train_char_validation(both):
    "Before: trained silently on wrong validation ids. After: refused before any loader is built."
    with pytest.raises(DataError) as e: loaders(both/"gpt2"/"train", both/"char"/"validation", GPT2Tokenizer())
    msg = str(e.value)
    assert msg.startswith(f"The validation data {both/'char'/'validation'} was tokenized with char (vocab 101, fingerprint "
                          f"{CharTokenizer().fingerprint}), but the tokenizer is gpt2 (vocab 50257, fingerprint {GPT2Tokenizer().fingerprint})")
    assert "run lp_preprocess again" in msg and "\n" not in msg

def test_char_train_gpt2_validation(both):
    "Before: IndexError at the first evaluation. After: refused before training."
    with pytest.raises(DataError, match="The validation data .* was tokenized with gpt2"):
        loaders(both/"char"/"train", both/"gpt2"/"validation", CharTokenizer())
    loaders(both/"char"/"train", both/"char"/"validation", CharTokenizer())   # the matching pair is fine

def test_same_name_and_size_other_alphabet(both):
    other = CharTokenizer(CharTokenizer().chars.replace("~", "é"))     # one character swapped
    assert (other.name, other.vocab_size) == ("char", 101) and other.fingerprint != CharTokenizer().fingerprint
    with pytest.raises(DataError, match="fingerprint"): loaders(both/"char"/"train", both/"char"/"validation", other)

def test_raw_bin_ids_out_of_range(tmp_path):
    "No manifest: the largest id of each shard is checked, naming the shard."
    (tmp_path/"train").mkdir(); (tmp_path/"valid").mkdir()
    (np.arange(200, dtype=np.uint16) % 100).tofile(tmp_path/"train"/"ok.bin")
    np.array([5] * 100 + [50256], dtype=np.uint16).tofile(tmp_path/"valid"/"v.bin")
    with pytest.raises(DataError, match=r"The validation data file .*v.bin holds token id 50256, but the tokenizer char has ids 0..100"):
        loaders(tmp_path/"train", tmp_path/"valid", CharTokenizer())
    loaders(tmp_path/"train", tmp_path/"valid", GPT2Tokenizer())


# --- preprocessing edge cases --------------------------------------------------------------------------------------

def test_single_line_shard_is_split(tmp_path):
    "Before: 'too small for a validation split ... it has 5000000 characters'. After: split between words, near val_ratio."
    (tmp_path/"raw").mkdir()
    line = " ".join(f"w{i % 9973}" for i in range(1_000_000))[:5_000_000]
    (tmp_path/"raw"/"line.txt").write_text(line)
    m = preprocess(tmp_path/"raw", tmp_path/"out", tokenizer=CharTokenizer(), progress=False, verbose=False)
    e = m["shards"]["line"]
    assert abs(e["tokens"]["validation"] / sum(e["tokens"].values()) - 0.1) < 0.01
    val = (tmp_path/"out"/"validation"/"line.txt").read_text()
    assert val.removesuffix("<|endoftext|>") in line and val[0] == "w"            # a run of whole words


def test_far_too_small_validation_warns(tmp_path, capsys):
    (tmp_path/"raw").mkdir()
    (tmp_path/"raw"/"thin.txt").write_text("bb\n" + "x" * 4 + "<|endoftext|>" + "x" * 4 + "\n\n")
    preprocess(tmp_path/"raw", tmp_path/"out", val_ratio=0.5, progress=False)
    warns = [l for l in capsys.readouterr().out.splitlines() if l.startswith("warning:")]
    assert len(warns) == 1 and "thin.txt: val_ratio=0.5 asked for 50%" in warns[0] and "the split got 3 (11.5%)" in warns[0]


def test_broken_and_looping_links_named_and_skipped(raw, tmp_path, capsys):
    (raw/"gone.txt").symlink_to(tmp_path/"moved_away.txt")
    (raw/"loop.txt").symlink_to(raw/"loop2.txt"); (raw/"loop2.txt").symlink_to(raw/"loop.txt")
    (raw/"linked.txt").symlink_to(raw/"a.txt")
    m = preprocess(raw, tmp_path/"out", progress=False)
    assert sorted(m["shards"]) == ["a", "b", "linked"]
    out = capsys.readouterr().out
    assert f"warning: {raw/'gone.txt'} is a broken symbolic link (to {tmp_path/'moved_away.txt'}); skipped." in out
    for name in ("loop.txt", "loop2.txt"): assert f"warning: {raw/name} is a loop of symbolic links; skipped." in out


# --- bytes per token, recorded for bits per byte -------------------------------------------------------------------

def test_bytes_recorded_per_split(both):
    from llm_playground.dataloader import bytes_per_token
    for d in ("gpt2", "char"):
        m = load_manifest(both/d)
        for s in ("train", "validation"):
            text = (both/d/s/"a.txt").read_text()
            assert m["totals"]["utf8_bytes"][s] == len(text.encode()) - m["totals"]["documents"][s] * len("<|endoftext|>")
    assert 3 < bytes_per_token(both/"gpt2"/"train") < 6 and 0.9 < bytes_per_token(both/"char"/"train") <= 1
