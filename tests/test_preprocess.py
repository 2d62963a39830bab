"""`lp_preprocess` as a real subprocess on real text (the built-in Python-docs corpus): token counts against tiktoken,
memmap-readable outputs, idempotent re-runs, bad input, and interruption."""
import collections, hashlib, json, os, shutil, signal, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import sigint_default

from llm_playground.corpus import write_python_docs
from llm_playground.preprocess import load_manifest, preprocess
from llm_playground.tokenizer import ENDOFTEXT, GPT2Tokenizer, gpt2_encoding


def cli_cmd(prog: str, *args) -> list[str]:
    "Command line of a console script of this package (the installed one, else the same entry point through `python -c`)."
    exe = Path(sys.executable).parent/prog
    mod, fn = {"lp_preprocess": ("preprocess", "main"), "lp_corpus": ("corpus", "corpus_main")}[prog]
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", f"from llm_playground.{mod} import {fn}; {fn}()"]
    return [*cmd, *map(str, args)]

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

def cli(prog: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(prog, *args), capture_output=True, text=True, timeout=300, env=ENV)

def ok(r): assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"

def snapshot(d: Path) -> dict:
    "Every file under `d` but the lock file (rewritten by every run that takes the lock): relative path -> (bytes, mtime)."
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}

def no_tmp_files(d: Path): assert [p for p in d.rglob("*.tmp")] == []


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    "The built-in corpus written by lp_corpus, then preprocessed by lp_preprocess."
    tmp = tmp_path_factory.mktemp("pre")
    ok(cli("lp_corpus", f"out_dir={tmp/'raw'}"))
    r = cli("lp_preprocess", f"input_dir={tmp/'raw'}", f"out_dir={tmp/'out'}")
    ok(r)
    return tmp, tmp/"raw", tmp/"out", r


def test_manifest_matches_tiktoken(done):
    _, raw, out, r = done
    enc, m = gpt2_encoding(), load_manifest(out)
    assert (m["tokenizer"], m["vocab_size"], m["eot_token"], m["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert (m["val_ratio"], m["seed"]) == (0.1, 1337)
    shards = sorted(p.stem for p in raw.glob("*.txt"))
    assert sorted(m["shards"]) == shards and len(shards) == 4
    for name in shards:
        e = m["shards"][name]
        assert e["sha256"] == hashlib.sha256((raw/f"{name}.txt").read_bytes()).hexdigest()
        for split in ("train", "validation"):
            text = (out/split/f"{name}.txt").read_text(encoding="utf-8")
            docs = [d for d in text.split(ENDOFTEXT) if d]
            # a direct count: every document encoded on its own, plus one end-of-text token each
            assert e["tokens"][split] == sum(len(enc.encode_ordinary(d)) + 1 for d in docs) > 0
            assert e["documents"][split] == len(docs)
            ids = np.memmap(out/split/f"{name}.bin", dtype=np.uint16, mode="r")
            assert ids.tolist() == enc.encode(text, allowed_special={ENDOFTEXT})
    tot = m["totals"]["tokens"]
    assert tot["train"] == sum(e["tokens"]["train"] for e in m["shards"].values())
    assert 0.05 < tot["validation"] / (tot["train"] + tot["validation"]) < 0.15
    assert tot["train"] + tot["validation"] > 100_000
    assert "4 shard(s) processed" in r.stdout


def test_no_text_lost_or_duplicated(done):
    "Train + validation hold exactly the non-whitespace characters of the raw shards."
    _, raw, out, _ = done
    def chars(texts): return collections.Counter(c for t in texts for c in "".join(t.replace(ENDOFTEXT, "").split()))
    raw_c = chars(p.read_text(encoding="utf-8") for p in raw.glob("*.txt"))
    out_c = chars((out/s/f"{p.stem}.txt").read_text(encoding="utf-8") for p in raw.glob("*.txt") for s in ("train", "validation"))
    assert raw_c == out_c


def test_rerun_is_idempotent(done):
    _, raw, out, _ = done
    before = snapshot(out)
    r = cli("lp_preprocess", f"input_dir={raw}", f"out_dir={out}")
    ok(r)
    assert "unchanged, skipped" in r.stdout and "nothing to do" in r.stdout
    assert snapshot(out) == before  # not even the manifest was rewritten


def test_changed_removed_and_reseeded(done):
    tmp, raw0, out0, _ = done
    raw, out = tmp/"raw2", tmp/"out2"
    shutil.copytree(raw0, raw); shutil.copytree(out0, out)
    m0 = load_manifest(out)
    (raw/"python_docs_03.txt").unlink()
    (raw/"python_docs_01.txt").write_text("A new first paragraph.\n\n" + (raw0/"python_docs_01.txt").read_text(encoding="utf-8"), encoding="utf-8")
    seeded = tmp/"out_seed"
    with ThreadPoolExecutor(2) as ex:
        r, rs = ex.map(lambda a: cli("lp_preprocess", *a), [(f"input_dir={raw}", f"out_dir={out}"),
                                                          (f"input_dir={raw0}", f"out_dir={seeded}", "preprocessing.seed=7")])
    ok(r); ok(rs)
    m = load_manifest(out)
    assert sorted(m["shards"]) == ["python_docs_00", "python_docs_01", "python_docs_02"]
    assert not (out/"train"/"python_docs_03.bin").exists() and not (out/"validation"/"python_docs_03.txt").exists()
    assert m["shards"]["python_docs_00"] == m0["shards"]["python_docs_00"]
    assert m["shards"]["python_docs_01"]["sha256"] != m0["shards"]["python_docs_01"]["sha256"]
    assert "python_docs_01.txt:" in r.stdout and "removed" in r.stdout and "unchanged, skipped" in r.stdout
    # same seed -> same bytes (deterministic); another seed -> another validation run
    ms = load_manifest(seeded)
    assert ms["seed"] == 7
    assert (seeded/"validation"/"python_docs_00.txt").read_text() != (out0/"validation"/"python_docs_00.txt").read_text()
    no_tmp_files(out)


def test_same_seed_same_bytes(done, tmp_path):
    _, raw, out0, _ = done
    preprocess(raw, tmp_path, progress=False, verbose=False, num_threads=1, batch_chars=10_000)  # other speed settings
    for split in ("train", "validation"):
        for p in (out0/split).iterdir(): assert (tmp_path/split/p.name).read_bytes() == p.read_bytes(), p


# --- bad input: every case runs as a real subprocess, all in parallel, once -------------------------------------------

LATIN = "Une première ligne.\n\nUne deuxième.\n".encode("latin-1")   # 'è' is 0xE8, invalid in UTF-8 here
LATIN_OFFSET = LATIN.index(b"\xe8")
GOOD = "\n\n".join(f"Paragraph {i}: some ordinary words." for i in range(10))
BLANK = " \n\n<|endoftext|>\n"

def _bad_cases(tmp: Path, done_raw: Path, done_out: Path) -> dict:
    "name -> (command-line arguments, text the error must contain, the out_dir that must stay untouched)."
    def d(name, files):
        p = tmp/name; p.mkdir()
        for fn, content in files.items(): (p/fn).write_bytes(content if isinstance(content, bytes) else content.encode())
        return p
    cases = {
        "missing_dir": ([f"input_dir={tmp/'nope'}"], ["nope", "does not exist"]),
        "empty_dir": ([f"input_dir={d('empty_dir', {})}"], ["empty_dir", "is empty"]),
        "no_txt": ([f"input_dir={d('no_txt', {'notes.md': 'hi', 'data.csv': 'a,b'})}"], ["has no .txt files", "notes.md"]),
        "empty_shard": ([f"input_dir={d('empty_shard', {'good.txt': GOOD, 'blank.txt': BLANK})}"], ["blank.txt", "empty shard"]),
        "not_utf8": ([f"input_dir={d('not_utf8', {'good.txt': GOOD, 'latin.txt': LATIN})}"], ["latin.txt", f"byte offset {LATIN_OFFSET}", "errors=replace"]),
        "too_small": ([f"input_dir={d('too_small', {'good.txt': GOOD, 'tiny.txt': 'x'})}"], ["tiny.txt", "too small for a validation split"]),
        "out_inside_in": ([f"input_dir={d('inside', {'good.txt': GOOD})}", f"out_dir={tmp/'inside'/'processed'}"], ["inside input_dir"]),
        "config_value": ([f"input_dir={d('cfg', {'good.txt': GOOD})}", "preprocessing.val_ratio=lots"], ["preprocessing.val_ratio"]),
    }
    out = {k: ([*args, f"out_dir={tmp/(k + '_out')}"] if not any(a.startswith("out_dir=") for a in args) else args, needles,
               tmp/(k + "_out")) for k, (args, needles) in cases.items()}
    # a bad shard added to a processed folder: the folder stays exactly as it was
    raw, prev = tmp/"existing_raw", tmp/"existing_out"
    shutil.copytree(done_raw, raw); shutil.copytree(done_out, prev)
    (raw/"zz_latin.txt").write_bytes(LATIN)
    out["bad_shard_added"] = ([f"input_dir={raw}", f"out_dir={prev}"], ["zz_latin.txt", f"byte offset {LATIN_OFFSET}"], prev)
    return out


@pytest.fixture(scope="module")
def bad(done, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(tmp, done[1], done[2])
    before = {k: snapshot(o) if o.exists() else None for k, (_, _, o) in cases.items()}
    with ThreadPoolExecutor(4) as ex:
        results = dict(zip(cases, ex.map(lambda c: cli("lp_preprocess", *c[0]), cases.values())))
    return cases, before, results


@pytest.mark.parametrize("case", ["missing_dir", "empty_dir", "no_txt", "empty_shard", "not_utf8", "too_small", "out_inside_in",
                                  "config_value", "bad_shard_added"])
def test_bad_input(bad, case):
    cases, before, results = bad
    _, needles, out_dir = cases[case]
    r = results[case]
    assert r.returncode == (2 if case == "config_value" else 1), (r.returncode, r.stdout, r.stderr)  # 2: a config error
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("lp_preprocess: error:"), r.stderr
    for n in needles: assert n in r.stderr, (n, r.stderr)
    # nothing half-written: out_dir not created, or (if it existed) untouched
    assert (snapshot(out_dir) if out_dir.exists() else None) == before[case]


@pytest.mark.parametrize("override,needle", [("preprocessing.val_ratio=1.5", "val_ratio"), ("preprocessing.val_ratio=0", "val_ratio"),
                                             ("preprocessing.errors=ignore", "strict or replace"),
                                             ("preprocessing.doc_boundary=paragraph", "eot, blank_line"),
                                             ("preprocessing.num_threads=-1", "num_threads"), ("preprocessing.force=maybe", "force")])
def test_bad_config_values(tmp_path, override, needle):
    "Checked before any work (in-process: the same code path as the command line, without starting a Python each time)."
    from llm_playground.config import ConfigError, compose_config
    from llm_playground.preprocess import preprocess_from_config
    raw = tmp_path/"raw"; raw.mkdir(); (raw/"good.txt").write_text(GOOD)
    with pytest.raises(ConfigError, match=needle):  # (a wrong type is refused while composing, a bad value by preprocess)
        preprocess_from_config(compose_config("preprocess", [f"input_dir={raw}", f"out_dir={tmp_path/'out'}", override]))
    assert not (tmp_path/"out").exists()


def test_errors_replace(tmp_path):
    raw = tmp_path/"raw"; raw.mkdir()
    (raw/"latin.txt").write_bytes(LATIN)
    r = cli("lp_preprocess", f"input_dir={raw}", f"out_dir={tmp_path/'out'}", "preprocessing.errors=replace")
    ok(r)
    assert f"byte offset {LATIN_OFFSET}" in r.stdout and "replaced" in r.stdout
    text = "".join((tmp_path/"out"/s/"latin.txt").read_text(encoding="utf-8") for s in ("train", "validation"))
    assert "\ufffd" in text and load_manifest(tmp_path/"out")["errors"] == "replace"


# --- interruption ----------------------------------------------------------------------------------------------------

def _consistent(out: Path):
    "The manifest lists only shards whose four files are complete; no temporary files are left."
    m = load_manifest(out)
    for name, e in m["shards"].items():
        for s in ("train", "validation"):
            ids = np.fromfile(out/s/f"{name}.bin", dtype=np.uint16)
            assert len(ids) == e["tokens"][s]
            assert ids.tolist() == gpt2_encoding().encode((out/s/f"{name}.txt").read_text(encoding="utf-8"), allowed_special={ENDOFTEXT})
    no_tmp_files(out)
    return m


class _Interrupted(GPT2Tokenizer):
    "GPT-2, but Ctrl-C arrives during the `after`-th call of encode_batch."
    def __init__(self, after): super().__init__(); self.calls, self.after = 0, after
    def encode_batch(self, texts, num_threads=8):
        self.calls += 1
        if self.calls == self.after: raise KeyboardInterrupt
        return super().encode_batch(texts, num_threads)


def test_interrupt_in_process(done, tmp_path):
    raw = done[1]
    with pytest.raises(KeyboardInterrupt):
        preprocess(raw, tmp_path, _Interrupted(after=6), batch_chars=50_000, progress=False, verbose=False)
    m = _consistent(tmp_path)
    assert 0 < len(m["shards"]) < 4
    m2 = preprocess(raw, tmp_path, progress=False, verbose=False)   # the next run finishes the job
    assert len(m2["shards"]) == 4 and all(m2["shards"][k] == v for k, v in m["shards"].items())
    _consistent(tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery differs on Windows")
def test_ctrl_c_subprocess(tmp_path):
    "A real Ctrl-C (SIGINT) in the middle of a run: exit 130, one-line message, consistent outputs."
    raw = tmp_path/"raw"
    for k in range(3): write_python_docs(raw, num_shards=4, name=f"copy{k}", verbose=False)  # 12 shards, ~1.4 MB
    p = subprocess.Popen(cli_cmd("lp_preprocess", f"input_dir={raw}", f"out_dir={tmp_path/'out'}", "preprocessing.num_threads=1",
                                 "preprocessing.batch_chars=20000"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=sigint_default)
    first = p.stdout.readline()              # the first shard is done
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert "train +" in first, (first, out, err)
    if p.returncode == 0: pytest.skip("the run finished before the signal arrived")
    assert p.returncode == 130, (out, err)
    assert "interrupted" in err and "Traceback" not in err, err
    m = _consistent(tmp_path/"out")
    assert 1 <= len(m["shards"]) < 12
