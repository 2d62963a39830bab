"""`tokenizer=bpe`: `lp_preprocess` as a real subprocess learns a byte-level BPE on the training split of real text,
saves it beside the data (named in the manifest with its sha256), reuses it, retrains it when the vocabulary size or
the training text changes; later commands find it from the data (`tokenizer_for_data`) and keep a copy in the run
(`bundle_tokenizer`); bad sizes and missing or changed files are one-line errors."""
import hashlib, json, os, random, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

from llm_playground.config import ConfigError, compose_config
from llm_playground.dataloader import bundle_tokenizer, check_tokens, tokenizer_for_data
from llm_playground.preprocess import TOKENIZER_FILE, load_manifest, split_documents
from llm_playground.tokenizer import BPETokenizer, build_tokenizer
from llm_playground.utils import DataError

FIXTURE = Path(__file__).parent.parent/"data"/"fixtures"/"pride_and_prejudice_ch1.txt"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def lp_preprocess(*args) -> subprocess.CompletedProcess:
    "`lp_preprocess` (the installed console script, else its entry point through `python -c`) as a real subprocess."
    exe = Path(sys.executable).parent/"lp_preprocess"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from llm_playground.preprocess import main; main()"]
    return subprocess.run([*cmd, *map(str, args), "preprocessing.progress=false"], capture_output=True, text=True, timeout=120, env=ENV)

def ok(r): assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"

def one_line_error(r, code: int, *parts: str):
    "The run failed with exit status `code` and a single `lp_preprocess: error:` line containing `parts`."
    assert r.returncode == code, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("lp_preprocess: error: "), r.stderr
    for p in parts: assert p in lines[0], lines[0]

def sha256(f: Path) -> str: return hashlib.sha256(f.read_bytes()).hexdigest()

def files(d: Path) -> dict:
    "Every file under `d` but the lock: relative path -> (sha256, mtime)."
    return {str(p.relative_to(d)): (sha256(p), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def raw(tmp_path) -> Path:
    "A folder of real text: the fixture chapter, and a second shard made of its paragraphs in reverse order."
    d = tmp_path/"raw"; d.mkdir()
    text = FIXTURE.read_text(encoding="utf-8")
    shutil.copy(FIXTURE, d/"pride.txt")
    (d/"reversed.txt").write_text("\n\n".join(reversed(text.split("\n\n"))), encoding="utf-8")
    return d


def test_preprocess_trains_reuses_and_retrains(raw, tmp_path):
    out = tmp_path/"out"
    r = lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=320", f"input_dir={raw}", f"out_dir={out}")
    ok(r)
    assert "BPE tokenizer: learned 320 tokens on the training split" in r.stdout
    m = load_manifest(out)
    assert (m["tokenizer"], m["vocab_size"], m["eot_token"], m["dtype"]) == ("bpe", 320, 319, "uint16")
    assert m["tokenizer_file"]["path"] == TOKENIZER_FILE and m["tokenizer_file"]["sha256"] == sha256(out/TOKENIZER_FILE)
    tok = BPETokenizer(out/TOKENIZER_FILE, sha256=m["tokenizer_file"]["sha256"])
    assert tok.fingerprint == m["tokenizer_fingerprint"]
    # learned on the training split only: training on exactly those documents gives the same file
    train_docs = [d for s in ("pride", "reversed") for d in split_documents((out/"train"/f"{s}.txt").read_text(encoding="utf-8"))]
    assert BPETokenizer.train(train_docs, 320).sha256 == tok.sha256
    val_docs = [d for s in ("pride", "reversed") for d in split_documents((out/"validation"/f"{s}.txt").read_text(encoding="utf-8"))]
    assert BPETokenizer.train(train_docs + val_docs, 320).sha256 != tok.sha256
    for split in ("train", "validation"):   # every shard decodes back to its text with the saved tokenizer
        for s in ("pride", "reversed"):
            ids = np.fromfile(out/split/f"{s}.bin", dtype=m["dtype"])
            assert tok.decode(ids) == (out/split/f"{s}.txt").read_text(encoding="utf-8")
    check_tokens([out/"train", out/"validation"], tok)

    before = files(out)   # a second run: the tokenizer and every shard reused, nothing rewritten
    r = lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=320", f"input_dir={raw}", f"out_dir={out}")
    ok(r)
    assert "BPE tokenizer unchanged" in r.stdout and "nothing to do" in r.stdout
    assert files(out) == before

    r = lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=400", f"input_dir={raw}", f"out_dir={out}")   # another size: retrained
    ok(r)
    m2 = load_manifest(out)
    assert m2["vocab_size"] == 400 and m2["tokenizer_file"]["sha256"] == sha256(out/TOKENIZER_FILE) != m["tokenizer_file"]["sha256"]
    assert m2["tokenizer_fingerprint"] != m["tokenizer_fingerprint"]
    tok2 = BPETokenizer(out/TOKENIZER_FILE, sha256=m2["tokenizer_file"]["sha256"])
    ids = np.fromfile(out/"train"/"pride.bin", dtype=m2["dtype"])
    assert len(ids) == m2["shards"]["pride"]["tokens"]["train"] < m["shards"]["pride"]["tokens"]["train"]
    assert tok2.decode(ids) == (out/"train"/"pride.txt").read_text(encoding="utf-8")
    with pytest.raises(DataError, match="was tokenized with bpe"): check_tokens(out/"train", tok)   # the old vocabulary no longer fits

    with open(raw/"pride.txt", "a", encoding="utf-8") as f: f.write("\nMr. Bennet said nothing more that evening.\n")
    r = lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=400", f"input_dir={raw}", f"out_dir={out}")   # changed text: retrained
    ok(r)
    assert "learned 400 tokens" in r.stdout
    m3 = load_manifest(out)
    assert m3["tokenizer_file"]["trained_on"] != m2["tokenizer_file"]["trained_on"]
    assert m3["tokenizer_file"]["sha256"] == sha256(out/TOKENIZER_FILE)
    assert not list(out.rglob("*.tmp"))


def test_tampered_or_missing_file_in_the_data_is_retrained(raw, tmp_path):
    out = tmp_path/"out"
    ok(lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=300", f"input_dir={raw}", f"out_dir={out}"))
    good, m = (out/TOKENIZER_FILE).read_bytes(), load_manifest(out)
    (out/TOKENIZER_FILE).write_bytes(good.replace(b'"he"', b'"hE"', 1))   # changed by hand
    r = lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=300", f"input_dir={raw}", f"out_dir={out}")
    ok(r)
    assert "changed after the data was tokenized" in r.stdout and "Retraining it." in r.stdout
    assert (out/TOKENIZER_FILE).read_bytes() == good and load_manifest(out)["shards"] == m["shards"]   # the same text: the same file
    (out/TOKENIZER_FILE).unlink()
    ok(lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=300", f"input_dir={raw}", f"out_dir={out}"))
    assert (out/TOKENIZER_FILE).read_bytes() == good


def test_bad_vocab_sizes_are_one_line_errors(raw, tmp_path):
    out = tmp_path/"out"
    one_line_error(lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=100", f"input_dir={raw}", f"out_dir={out}"), 2,
                   "tokenizer.vocab_size=100 is too small for a byte-level BPE", "at least 257")
    one_line_error(lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=50000", f"input_dir={raw}", f"out_dir={out}"), 1,
                   "too small for tokenizer.vocab_size=50000", "at most")
    assert not out.exists()   # nothing written, no stub folder
    ok(lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=257", f"input_dir={raw}", f"out_dir={out}"))   # no merges: bytes
    m = load_manifest(out)
    assert m["vocab_size"] == 257 and m["totals"]["tokens"]["train"] == m["totals"]["utf8_bytes"]["train"] + m["totals"]["documents"]["train"]


def test_later_commands_find_the_data_tokenizer(raw, tmp_path):
    out = tmp_path/"out"
    ok(lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=300", f"input_dir={raw}", f"out_dir={out}"))
    m = load_manifest(out)
    path_less = compose_config("pretrain", ["tokenizer=bpe"]).tokenizer   # vocab_size 1280 by default: the data's file decides
    tok, cfg = tokenizer_for_data(path_less, str(out/"train"))
    assert cfg == {"_target_": "llm_playground.tokenizer.BPETokenizer", "path": str((out/TOKENIZER_FILE).resolve()),
                   "sha256": m["tokenizer_file"]["sha256"], "vocab_size": 300}
    assert tok.fingerprint == m["tokenizer_fingerprint"]
    run = tmp_path/"run"; run.mkdir()
    saved = bundle_tokenizer(cfg, run)
    assert saved["path"] == "tokenizer.json" and sha256(run/"tokenizer.json") == m["tokenizer_file"]["sha256"]
    shutil.move(run, tmp_path/"moved")
    resumed_tok, resumed = tokenizer_for_data(saved, None, base_dir=tmp_path/"moved")   # resuming the moved run: its own copy
    assert resumed_tok.fingerprint == tok.fingerprint and bundle_tokenizer(resumed, tmp_path/"moved") == saved
    shutil.rmtree(out)   # the run no longer needs the data folder
    assert build_tokenizer(saved, base_dir=tmp_path/"moved").fingerprint == tok.fingerprint


def test_relative_paths_are_resolved_before_the_run_directory(raw, tmp_path, monkeypatch):
    "`dataset.train` and `tokenizer.path` given relative to the working directory still name the right file in the run."
    ok(lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=300", f"input_dir={raw}", f"out_dir={tmp_path/'out'}"))
    monkeypatch.chdir(tmp_path)
    run = tmp_path/"models"/"run"; run.mkdir(parents=True)
    for section, data in [(compose_config("pretrain", ["tokenizer=bpe"]).tokenizer, "out/train"),
                          ({"_target_": "llm_playground.tokenizer.BPETokenizer", "path": "out/tokenizer.json"}, None)]:
        tok, cfg = tokenizer_for_data(section, data)
        assert cfg["path"] == str((tmp_path/"out"/TOKENIZER_FILE).resolve())
        assert build_tokenizer(bundle_tokenizer(cfg, run), base_dir=run).fingerprint == tok.fingerprint


def test_missing_or_changed_file_for_later_commands_is_one_line(raw, tmp_path):
    out = tmp_path/"out"
    ok(lp_preprocess("tokenizer=bpe", "tokenizer.vocab_size=300", f"input_dir={raw}", f"out_dir={out}"))
    path_less = compose_config("pretrain", ["tokenizer=bpe"]).tokenizer
    good = (out/TOKENIZER_FILE).read_bytes()
    (out/TOKENIZER_FILE).write_bytes(good + b" ")
    with pytest.raises(DataError) as e: tokenizer_for_data(path_less, out/"train")
    assert "changed after the data was tokenized" in str(e.value) and "\n" not in str(e.value)
    (out/TOKENIZER_FILE).unlink()
    with pytest.raises(DataError) as e: tokenizer_for_data(path_less, out/"train")
    assert f"{out/TOKENIZER_FILE} not found" in str(e.value) and "\n" not in str(e.value)
    ok(lp_preprocess(f"input_dir={raw}", f"out_dir={tmp_path/'gpt2'}"))   # data made with GPT-2 has no trained tokenizer to find
    with pytest.raises(ConfigError) as e: tokenizer_for_data(path_less, tmp_path/"gpt2"/"validation")
    assert "names no trained tokenizer (the data was made with gpt2)" in str(e.value) and "\n" not in str(e.value)


def test_round_trip_on_arbitrary_unicode():
    tok = BPETokenizer.train([FIXTURE.read_text(encoding="utf-8")], 400)
    rng = random.Random(0)
    def text(k):   # any code point but surrogates, weighted towards ASCII, spaces and newlines
        pick = lambda: rng.choice([rng.randrange(0x20, 0x7f), rng.choice([0x20, 0x0a, 0x09, 0x0d, 0x3000]), rng.randrange(0, 0xd800),
                                   rng.randrange(0xe000, 0x110000)])
        return "".join(map(chr, (pick() for _ in range(k))))
    samples = [text(rng.randrange(0, 60)) for _ in range(300)] + ["", "<|endoftext|>", "a<|endoftext|><|endoftext|>b", "\x00\ufeff\U0010ffff"]
    for s in samples: assert tok.decode(tok.encode(s)) == s, repr(s)
    assert tok.encode_batch(samples) == [tok.encode(s) for s in samples]
    assert tok.encode("x<|endoftext|>y")[1] == tok.eot_token == 399


def test_fingerprint_differs_between_vocab_sizes():
    text = FIXTURE.read_text(encoding="utf-8")
    fps = {n: BPETokenizer.train([text], n).fingerprint for n in (257, 300, 400)}
    assert len(set(fps.values())) == 3
    assert BPETokenizer.train([text], 300).fingerprint == fps[300]   # deterministic
