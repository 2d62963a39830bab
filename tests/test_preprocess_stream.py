"""Streaming of large shards by `preprocess` (shards above `STREAM_BYTES`, read `BLOCK_BYTES` at a time), on generated
text of a few MB with both constants lowered. What must be equal, exactly:
  - the validation split is the byte range `_val_region` picks; the documents of each split are `split_documents` of the
    text of that range and of the text around it (joined by a document boundary), and the `.txt` files hold them;
  - the `.bin` ids are `encode_documents` of those documents: the ids the whole-file path gives the same documents;
  - the block size changes no output byte; the manifest counts are those of the documents;
  - no byte of text is lost or duplicated (the non-space characters of both splits are those of the file).
Then invalid UTF-8 at a block edge (strict: the offset in the file; replace: what decoding the whole file gives), a
full disk while streaming, and peak memory of the real command that does not grow with the size of the file."""
import collections, hashlib, os, resource, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

import llm_playground.preprocess as pp
from llm_playground.preprocess import (ENDOFTEXT, SPLITS, PreprocessError, _val_region, encode_documents, load_manifest,
                                       preprocess, split_documents)
from llm_playground.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there one all we their can has been if more when will would who so no time data model stream "
         "block café naïve über 東京 ünïcödé").split()
ASCII_WORDS = [w for w in WORDS if w.isascii()]

def write_text(path: Path, nbytes: float, seed: int = 0, docs_every: int = 3000, words=WORDS):
    "Write about `nbytes` of generated UTF-8 text: random `words` in paragraphs, an <|endoftext|> every `docs_every` paragraphs."
    rng, words, n = np.random.default_rng(seed), np.array(words), 0
    with open(path, "w", encoding="utf-8") as f:
        while n < nbytes:
            w = words[rng.integers(0, len(words), 200_000)]
            cuts = np.cumsum(rng.integers(20, 200, 3000)); cuts = cuts[cuts < len(w)]
            paras = [" ".join(p) for p in np.split(w, cuts)]
            s = "".join("\n\n".join(paras[i:i + docs_every]) + f"\n{ENDOFTEXT}\n" for i in range(0, len(paras), docs_every))
            f.write(s); n += len(s.encode())

@pytest.fixture
def small_blocks(monkeypatch):
    "Stream every shard above 256 KiB, in blocks of 64 KiB."
    monkeypatch.setattr(pp, "STREAM_BYTES", 256 * 1024); monkeypatch.setattr(pp, "BLOCK_BYTES", 64 * 1024)

@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    "A folder with one ~3 MB shard: a one-paragraph document far longer than a block, then many documents of paragraphs."
    d = tmp_path_factory.mktemp("stream")/"raw"; d.mkdir()
    write_text(d/"tmp.txt", 2.5e6, docs_every=40)
    long_doc = " ".join(np.random.default_rng(1).choice(WORDS, 60_000))  # ~300 KB without a line break: cut before spaces
    (d/"big.txt").write_text(long_doc + f"\n{ENDOFTEXT}\n" + (d/"tmp.txt").read_text(encoding="utf-8"), encoding="utf-8")
    (d/"tmp.txt").unlink()
    return d

def region(path: Path, m: dict) -> tuple[int, int]:
    with open(path, "rb") as f: return _val_region(f, path.stat().st_size, m["val_ratio"], m["seed"], path.stem)

def expected_docs(path: Path, m: dict, doc_boundary: str = "eot") -> dict:
    "The documents of each split, by the definition: `split_documents` of the validation byte range and of the rest."
    raw, (s, e) = path.read_bytes(), region(path, m)
    return {"train": split_documents(raw[:s].decode() + ENDOFTEXT + raw[e:].decode(), doc_boundary),
            "validation": split_documents(raw[s:e].decode(), doc_boundary)}

def outputs(d: Path) -> dict: return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_streamed_outputs_are_the_documents_of_the_byte_region(raw, small_blocks, tmp_path):
    tok, p = GPT2Tokenizer(), raw/"big.txt"
    m = preprocess(raw, tmp_path/"out", tok, progress=False, verbose=False)
    want, e = expected_docs(p, m), m["shards"]["big"]
    assert len(want["train"]) > 30 and len(want["validation"]) > 3 and len(want["train"][0]) > 3 * pp.BLOCK_BYTES
    for s in SPLITS:
        assert (tmp_path/"out"/s/"big.txt").read_text(encoding="utf-8") == ENDOFTEXT.join(want[s]) + ENDOFTEXT
        ids = np.fromfile(tmp_path/"out"/s/"big.bin", dtype=np.uint16)
        assert np.array_equal(ids, encode_documents(want[s], tok))      # what the whole-file path writes for them
        assert (e["documents"][s], e["tokens"][s], e["utf8_bytes"][s]) == (len(want[s]), len(ids), sum(len(d.encode()) for d in want[s]))
    assert (e["bytes"], e["sha256"]) == (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    assert abs(e["utf8_bytes"]["validation"] / sum(e["utf8_bytes"].values()) - 0.1) < 0.01
    assert not [f for f in (tmp_path/"out").rglob("*.tmp")]


def test_no_text_lost_or_duplicated(raw, small_blocks, tmp_path):
    "Independent of the region's definition: the non-space characters of train + validation are those of the file."
    preprocess(raw, tmp_path/"out", CharTokenizer.from_text((raw/"big.txt").read_text(encoding="utf-8")), progress=False, verbose=False)
    chars = lambda t: collections.Counter("".join(t.replace(ENDOFTEXT, "").split()))
    split_text = "".join((tmp_path/"out"/s/"big.txt").read_text(encoding="utf-8") for s in SPLITS)
    assert chars(split_text) == chars((raw/"big.txt").read_text(encoding="utf-8"))


def test_block_size_changes_nothing(raw, monkeypatch, tmp_path):
    monkeypatch.setattr(pp, "STREAM_BYTES", 256 * 1024)
    for block in (64 * 1024, 5000):
        monkeypatch.setattr(pp, "BLOCK_BYTES", block)
        preprocess(raw, tmp_path/f"b{block}", doc_boundary="blank_line", progress=False, verbose=False)
    assert outputs(tmp_path/"b65536") == outputs(tmp_path/"b5000")
    m = load_manifest(tmp_path/"b5000"); want = expected_docs(raw/"big.txt", m, "blank_line")
    assert [m["shards"]["big"]["documents"][s] for s in SPLITS] == [len(want[s]) for s in SPLITS]


def test_small_shards_keep_the_whole_file_path(raw, tmp_path):
    "Below the threshold nothing changes: the region is `split_validation`'s, not the byte region's."
    m = preprocess(raw, tmp_path/"whole", progress=False, verbose=False)   # the default threshold: 3 MB is small
    val = (tmp_path/"whole"/"validation"/"big.txt").read_text(encoding="utf-8")
    assert val != ENDOFTEXT.join(expected_docs(raw/"big.txt", m)["validation"]) + ENDOFTEXT


def block_edge_file(d: Path, bad: bytes) -> tuple[Path, int]:
    "An ASCII shard with `bad` written across a block edge (64 KiB blocks, counted from the start of its region); its offset."
    d.mkdir(); p = d/"x.txt"; write_text(p, 400_000, seed=3, words=ASCII_WORDS)
    m = {"val_ratio": 0.1, "seed": 1337}
    (s, e), raw = region(p, m), p.read_bytes()
    at = e + 64 * 1024 - 1 if e + 64 * 1024 + 10 < len(raw) else 64 * 1024 - 1   # in the last train region, else the first
    assert at + 10 < (len(raw) if at > e else s)
    p.write_bytes(raw[:at] + bad + raw[at + len(bad):])
    assert region(p, m) == (s, e)
    return p, at

def test_invalid_utf8_at_a_block_edge(small_blocks, tmp_path):
    p, at = block_edge_file(tmp_path/"raw", b"\xe2\x82")             # a 3-byte character missing its last byte, cut by the edge
    r = p.read_bytes()
    assert r[at:at + 2] == b"\xe2\x82" and r[:at].decode() and r[at + 2:].decode()
    with pytest.raises(PreprocessError, match=f"x.txt: invalid UTF-8 at byte offset {at} "): preprocess(p.parent, tmp_path/"o", progress=False)
    assert not (tmp_path/"o").exists()
    preprocess(p.parent, tmp_path/"o", errors="replace", progress=False, verbose=False)
    m = load_manifest(tmp_path/"o"); s, e = region(p, m)
    want = split_documents(r[:s].decode(errors="replace") + ENDOFTEXT + r[e:].decode(errors="replace"))
    got = (tmp_path/"o"/"train"/"x.txt").read_text(encoding="utf-8")
    assert got == ENDOFTEXT.join(want) + ENDOFTEXT and got.count("\ufffd") == 1

def test_character_cut_by_a_block_edge(small_blocks, tmp_path):
    p, at = block_edge_file(tmp_path/"raw", "€".encode())           # a valid 3-byte character across the edge
    preprocess(p.parent, tmp_path/"o", progress=False, verbose=False)
    text = "".join((tmp_path/"o"/s/"x.txt").read_text(encoding="utf-8") for s in SPLITS)
    assert text.count("€") == 1 and "\ufffd" not in text


def test_full_disk_while_streaming(raw, small_blocks, small_fs):
    "The temporary files grow block by block: a full disk is one line naming the real file, and nothing stays behind."
    out = small_fs("1m")/"out"
    with pytest.raises(PreprocessError, match=r"Could not write .* No space left on device") as e: preprocess(raw, out, progress=False, verbose=False)
    assert ".tmp" not in str(e.value)
    assert not [f for f in out.parent.rglob("*.tmp")]


def test_bpe_trains_on_the_streamed_training_documents(raw, small_blocks, tmp_path):
    m = preprocess(raw, tmp_path/"bpe", BPETokenizer(vocab_size=320), progress=False, verbose=False)
    assert m["tokenizer_fingerprint"] == BPETokenizer.train(expected_docs(raw/"big.txt", m)["train"], 320).fingerprint


PEAK = ("import resource, sys, llm_playground.preprocess as p\n"
        "p.STREAM_BYTES, p.BLOCK_BYTES = 1 << 20, 256 << 10\n"
        "sys.argv = ['lp_preprocess', *sys.argv[1:]]\n"
        "try: p.main()\n"
        "finally: print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")

def peak_rss_kb(inp: Path, out: Path) -> int:
    "Peak RSS of `lp_preprocess` (its entry point, with the threshold at 1 MiB and 256 KiB blocks) in a real process."
    r = subprocess.run([sys.executable, "-c", PEAK, f"input_dir={inp}", f"out_dir={out}", "tokenizer=char",
                        "preprocessing.errors=replace", "preprocessing.progress=false"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stderr.split("peak")[-1])

def test_peak_memory_does_not_grow_with_the_file(tmp_path):
    "16 MB streamed takes no more memory than 4 MB (read whole, the 12 MB more cost some 70 MB more)."
    (tmp_path/"a").mkdir(); (tmp_path/"b").mkdir()
    write_text(tmp_path/"b"/"x.txt", 16e6, words=ASCII_WORDS)
    with open(tmp_path/"b"/"x.txt", "rb") as f: (tmp_path/"a"/"x.txt").write_bytes(f.read(4_000_000))
    small, large = peak_rss_kb(tmp_path/"a", tmp_path/"oa"), peak_rss_kb(tmp_path/"b", tmp_path/"ob")
    print(f"peak RSS {small / 1e3:.1f} MB for 4 MB, {large / 1e3:.1f} MB for 16 MB")
    assert large - small < 6_000, f"peak RSS {small / 1e3:.0f} MB for 4 MB, {large / 1e3:.0f} MB for 16 MB"
