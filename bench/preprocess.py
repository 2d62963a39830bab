"""Throughput of `lp_preprocess` against bare tiktoken batch encoding of the same text.

    python bench/preprocess.py [--mb 8] [--shards 8] [--threads 0] [--repeats 5] [--single]

Builds a multi-MB corpus from the built-in Python docs (topics rotated per shard, so the shards differ) in a temporary
folder, then measures, in the same run and on the same documents:
  - preprocess(...): the whole job (hash, read, split, tokenize, write .bin/.txt atomically, manifest), force=True;
  - bare tiktoken:   read the shard files, then Encoding.encode_ordinary_batch(shard texts, num_threads=T) (one task per
                     shard; the literal <|endoftext|> markers are encoded as ordinary text), or
                     Encoding.encode_ordinary_batch(documents, num_threads=T) (one task per document).
                     The files are read inside the timing, as preprocess must: besides being fair, this gives tiktoken
                     fresh str objects (a str caches its UTF-8 form, which would favour repeated runs on the same objects).
The three are run in turn, --repeats times (interleaved, so that a busy moment on a shared machine hits all of them),
and the best wall time of each is kept. Reports tokens/s, process CPU seconds, and the ratios of
preprocess to each bare variant (target >= 0.8).
"""
import argparse, os, sys, tempfile, time
from pathlib import Path

from llm_playground.corpus import python_docs_topics
from llm_playground.preprocess import ENDOFTEXT, _cpu_count, preprocess, split_documents
from llm_playground.tokenizer import GPT2Tokenizer, gpt2_encoding


def make_corpus(folder: Path, mb: float, shards: int, single: bool = False) -> list[Path]:
    "Write `shards` files totalling about `mb` MB of Python-docs text, documents separated by <|endoftext|> (`single`: blank lines, one document per file)."
    topics = list(python_docs_topics().values())
    per_shard, paths = mb * 1e6 / shards, []
    for i in range(shards):
        rot = topics[i * 7 % len(topics):] + topics[:i * 7 % len(topics)]
        docs, size, j = [], 0, 0
        while size < per_shard:
            d = rot[j % len(rot)].strip(); docs.append(d); size += len(d.encode()); j += 1
        sep = "\n\n" if single else f"\n{ENDOFTEXT}\n"
        p = folder/f"shard_{i:02d}.txt"; p.write_text(sep.join(docs) + "\n", encoding="utf-8"); paths.append(p)
    return paths


def read(paths): return [p.read_text(encoding="utf-8") for p in paths]


def timed(f):
    "(wall seconds, process CPU seconds, result) of one call of `f`."
    c0, t0 = os.times(), time.perf_counter()
    res = f()
    t1, c1 = time.perf_counter(), os.times()
    return t1 - t0, (c1.user + c1.system) - (c0.user + c0.system), res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size in MB (default 8)")
    ap.add_argument("--shards", type=int, default=8, help="number of shards (default 8)")
    ap.add_argument("--threads", type=int, default=0, help="encoding threads for both (default 0: one per core)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats, best time kept (default 5)")
    ap.add_argument("--single", action="store_true", help="each shard is one long document (like a novel), not many")
    a = ap.parse_args()
    threads = a.threads or _cpu_count()
    enc, tok = gpt2_encoding(), GPT2Tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp)/"raw", Path(tmp)/"processed"; raw.mkdir()
        paths = make_corpus(raw, a.mb, a.shards, a.single)
        nbytes = sum(p.stat().st_size for p in paths)
        texts = [p.read_text(encoding="utf-8") for p in paths]
        docs = [d for t in texts for d in split_documents(t)]
        enc.encode_ordinary_batch(docs[:50], num_threads=threads)  # warm-up
        jobs = {"preprocess (whole job)": lambda: preprocess(raw, out, tok, num_threads=threads, force=True, progress=False, verbose=False),
                "bare encode_ordinary_batch(shard texts)": lambda: enc.encode_ordinary_batch(read(paths), num_threads=threads),
                "bare encode_ordinary_batch(documents)": lambda: enc.encode_ordinary_batch(
                    [d for t in read(paths) for d in t.split(ENDOFTEXT)], num_threads=threads)}
        best = {k: (float("inf"), float("inf"), None) for k in jobs}
        for _ in range(a.repeats):
            for k, f in jobs.items():
                wall, cpu, res = timed(f)
                best[k] = (min(wall, best[k][0]), min(cpu, best[k][1]), res)
    ntok = [sum(best["preprocess (whole job)"][2]["totals"]["tokens"].values()),
            sum(map(len, best["bare encode_ordinary_batch(shard texts)"][2])),
            sum(map(len, best["bare encode_ordinary_batch(documents)"][2])) + len(best["bare encode_ordinary_batch(documents)"][2])]  # + one eot per document
    rows = [(k, n, best[k][0], best[k][1]) for k, n in zip(jobs, ntok)]
    print(f"corpus: {nbytes/1e6:.1f} MB of Python docs in {len(paths)} shards, {len(docs):,} documents; threads={threads} "
          f"(cpus available: {_cpu_count()}); best of {a.repeats}, interleaved")
    for name, n, t, c in rows: print(f"  {name:40s} {n:>10,} tokens  {t:7.3f} s  {n/t/1e6:6.2f} M tokens/s  (cpu {c:.2f} s)")
    speed = [n / t for _, n, t, _ in rows]
    print(f"ratio preprocess / bare on the same documents:          {speed[0] / speed[2]:.2f} (target >= 0.8)")
    print(f"ratio preprocess / bare on whole files (fastest call):  {speed[0] / speed[1]:.2f}")
    print(f"process CPU, bare whole files / preprocess:             {rows[1][3] / rows[0][3]:.2f} (the bound on a machine that tokenization saturates)")
    return 0


if __name__ == "__main__": sys.exit(main())
