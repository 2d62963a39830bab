"""`lp_corpus` as a real subprocess: the built-in Python-docs corpus, and pinned downloads (offline, via file:// URLs)."""
import hashlib, os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llm_playground.config import compose_config
from llm_playground.corpus import python_docs_topics, reflow
from llm_playground.preprocess import split_documents


def cli(prog: str, *args: str) -> subprocess.CompletedProcess:
    "Run a console script of this package (the installed one, else the same entry point through `python -c`)."
    exe = Path(sys.executable).parent/prog
    mod, fn = {"lp_preprocess": ("preprocess", "main"), "lp_corpus": ("corpus", "corpus_main")}[prog]
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", f"from llm_playground.{mod} import {fn}; {fn}()"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "Every lp_corpus invocation of this file, run in parallel once (each one starts a Python, imports torch, ...)."
    tmp = tmp_path_factory.mktemp("corpus")
    src = tmp/"src"/"story.txt"; src.parent.mkdir()
    src.write_bytes("It was a dark and stormy night.\n\nThe end. Café.\n".encode("utf-8"))
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    url = src.as_uri()
    (tmp/"again").mkdir(); (tmp/"again"/"the_verdict.txt").write_bytes(src.read_bytes())
    (tmp/"mine").mkdir(); (tmp/"mine"/"the_verdict.txt").write_text("my own edited copy\n")
    cases = {
        "docs": ("lp_corpus", f"out_dir={tmp/'docs'}"),
        "good": ("lp_corpus", "corpus=the_verdict", f"out_dir={tmp/'good'}", f"corpus.url={url}", f"corpus.sha256={good}"),
        "again": ("lp_corpus", "corpus=the_verdict", f"out_dir={tmp/'again'}", f"corpus.url={tmp/'nowhere'}", f"corpus.sha256={good}"),
        "mismatch": ("lp_corpus", "corpus=the_verdict", f"out_dir={tmp/'bad'/'deeper'}", f"corpus.url={url}", f"corpus.sha256={'0' * 64}"),
        "differs": ("lp_corpus", "corpus=the_verdict", f"out_dir={tmp/'mine'}", f"corpus.url={url}", f"corpus.sha256={good}"),
        "missing": ("lp_corpus", "corpus=the_verdict", f"out_dir={tmp/'missing'}", f"corpus.url={(tmp/'nope.txt').as_uri()}"),
        "shakespeare": ("lp_corpus", "corpus=tinyshakespeare", f"out_dir={tmp/'ts'}"),
    }
    with ThreadPoolExecutor(4) as ex: results = dict(zip(cases, ex.map(lambda c: cli(*c), cases.values())))
    return tmp, src, results


def ok(r): assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"


def failed_cleanly(r, *needles):
    "Non-zero exit, a one-line message containing `needles`, and no traceback."
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles: assert n in r.stderr, r.stderr


def test_packaged_shakespeare(runs):
    "The packaged text is copied out, offline, byte for byte the pinned file."
    tmp, _, res = runs
    ok(res["shakespeare"])
    assert hashlib.sha256((tmp/"ts"/"tinyshakespeare.txt").read_bytes()).hexdigest() == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_python_docs_corpus(runs):
    tmp, _, res = runs
    ok(res["docs"])
    files = sorted((tmp/"docs").iterdir())
    assert [p.name for p in files] == [f"python_docs_{i:02d}.txt" for i in range(4)]
    docs = [d for p in files for d in split_documents(p.read_text(encoding="utf-8"))]
    assert docs == [reflow(t) for t in python_docs_topics().values() if t.strip()]
    assert [d.split() for d in docs] == [t.split() for t in python_docs_topics().values() if t.strip()]  # same words
    assert sum(p.stat().st_size for p in files) > 300_000           # a real corpus, not a stub


def test_python_docs_rerun_unchanged(runs):
    tmp, _, _ = runs
    before = {p: p.stat().st_mtime_ns for p in (tmp/"docs").iterdir()}
    r = cli("lp_corpus", f"out_dir={tmp/'docs'}")
    ok(r); assert "unchanged" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp/"docs").iterdir()} == before


def test_download_good(runs):
    tmp, src, res = runs
    ok(res["good"])
    assert (tmp/"good"/"the_verdict.txt").read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp/"good").iterdir()] == ["the_verdict.txt"]
    assert "sha256 ok" in res["good"].stdout


def test_download_skipped_when_present(runs):
    _, _, res = runs
    ok(res["again"]); assert "already present" in res["again"].stdout  # the (unreachable) url was never opened


def test_download_checksum_mismatch(runs):
    tmp, _, res = runs
    failed_cleanly(res["mismatch"], "lp_corpus: error:", "sha256 mismatch", "Nothing was written")
    assert res["mismatch"].returncode == 1
    assert not (tmp/"bad").exists()   # no file, no temporary file, not even the folders made for it


def test_download_never_replaces_a_different_local_file(runs):
    tmp, _, res = runs
    failed_cleanly(res["differs"], "lp_corpus: error:", "the_verdict.txt exists but is not the pinned file", "it was kept",
                   "corpus.filename")
    assert res["differs"].returncode == 1 and len(res["differs"].stderr.strip().splitlines()) == 1
    assert (tmp/"mine"/"the_verdict.txt").read_text() == "my own edited copy\n"
    assert [p.name for p in (tmp/"mine").iterdir()] == ["the_verdict.txt"]


def test_download_unreachable(runs):
    tmp, _, res = runs
    failed_cleanly(res["missing"], "Could not download", "nope.txt")
    assert not (tmp/"missing").exists()


def test_bad_config(tmp_path):
    from llm_playground.config import ConfigError
    from llm_playground.corpus import corpus_from_config
    for override, needle in [("corpus.num_shards=0", "num_shards"), ("corpus.source=ftp", "python_docs, package or url"),
                             ("corpus.num_shards=many", "corpus.num_shards")]:
        with pytest.raises(ConfigError, match=needle):
            corpus_from_config(compose_config("corpus", [f"out_dir={tmp_path}", override]))
    assert list(tmp_path.iterdir()) == []


def test_pinned_corpora():
    v = compose_config("corpus", ["corpus=the_verdict"]).corpus
    assert v.url == "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
    assert v.sha256 == "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
    s = compose_config("corpus", ["corpus=tinyshakespeare"]).corpus
    assert s.url == "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    assert s.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    d = compose_config("corpus")
    assert d.corpus.source == "python_docs" and d.out_dir.endswith(os.path.join("data", "raw"))
