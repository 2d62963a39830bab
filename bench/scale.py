#!/usr/bin/env python
"""Data at scale with bounded memory (issue 12): `lp_preprocess` on a multi-GB text file, and the dataset + sampler on a
multi-billion-token set of `.bin` shards. Not run in CI (minutes, and GBs of disk).

usage: python bench/scale.py [--gb 2] [--tokenizer gpt2|bpe] [--overrides K=V ...] [--tokens 2e9] [--shards 20] [--batches 2000] [--batch-size 8] [--context 1024]
                             [--stride N] [--parts preprocess data] [--dir /tmp] [--keep] [--json out.json]

(a) preprocess: writes about --gb GB of generated text (random words of a fixed vocabulary, a few with non-ASCII
    letters, in paragraphs of 20-200 words, an <|endoftext|> every 40 paragraphs) as one shard, then runs the real
    `lp_preprocess` (GPT-2 BPE, the default config; --tokenizer bpe: a BPE trained on the training split) on it as a subprocess and reports wall time, MB/s of input and its
    peak RSS (getrusage of the child), with the tokens from the manifest. The text is 16 distinct generated chunks of
    16 MB written in turn (generating 2 GB of words in Python would take longer than tokenizing them).
(b) data: writes --tokens random uint16 ids (0..50256) directly as --shards `.bin` files (no manifest: the dataset
    reads uint16 by default), then builds `NextTokenPredictionDataset` (max_length --context, stride --stride or no
    overlap) and `create_dataloader` (batch --batch-size, shuffle) and iterates --batches batches, reporting this
    process's RSS (anonymous and file-backed, from /proc/self/status) after building the dataset, after building the
    loader (its `ResumableSampler`), after the first batch and after all batches, the peak RSS of that phase (VmHWM,
    reset before it), and batches/s. File-backed RSS (RssFile) is page cache mapped into the process by the memory
    maps: the kernel's readahead and fault-around map up to ~64-128 KB around each 2 KB window read, so it grows with
    the batches read until the whole set is mapped; it is shared and reclaimable, unlike RssAnon (madvise(MADV_RANDOM)
    on the maps did not change it here, with the shards in the page cache: fault-around maps pages already cached); then a resume mid-epoch: `state_dict` after the batches, a fresh loader
    `load_state_dict`s it, and its next batches must equal the first loader's.
Only the public API of the data chapter is used, so the numbers follow whatever `ResumableSampler` is installed.
Check the free disk first (`df -h`): (a) needs about 3.5x --gb (the input, the .bin and the .txt copies), (b) 2 bytes
per token. Temporary files are deleted at the end unless --keep.
"""
import argparse, json, os, resource, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there one all we their can has been if more when will would who so no time data model stream "
         "block memory paragraph token byte shard window sampler café naïve über").split()


def status_mb(*keys) -> dict:
    "Fields of /proc/self/status in MB (VmRSS, RssAnon, RssFile, VmHWM, ...)."
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in keys: out[k] = int(v.split()[0]) / 1024
    return out

def rss() -> dict: return status_mb("VmRSS", "RssAnon", "RssFile")

def reset_peak():
    "Make VmHWM the current RSS (Linux: writing 5 to clear_refs), so the next peak is that of the phase that follows."
    try: Path("/proc/self/clear_refs").write_text("5")
    except OSError as e: print(f"(cannot reset the peak RSS: {e}; VmHWM below includes earlier phases)")

def fmt(d: dict) -> str: return ", ".join(f"{k} {v:,.0f} MB" for k, v in d.items())


def write_text(path: Path, nbytes: float, seed: int = 0, chunk_mb: int = 16, n_chunks: int = 16) -> int:
    "Write about `nbytes` of generated text to `path`, cycling through `n_chunks` distinct chunks of `chunk_mb` MB."
    rng, words, chunks = np.random.default_rng(seed), np.array(WORDS), []
    while len(chunks) < n_chunks and len(chunks) * chunk_mb * 1e6 < nbytes:
        paras, size = [], 0
        while size < chunk_mb * 1e6:
            w = words[rng.integers(0, len(words), 200_000)]
            cuts = np.cumsum(rng.integers(20, 200, 3000)); cuts = cuts[cuts < len(w)]
            ps = [" ".join(p) for p in np.split(w, cuts)]; paras += ps; size += sum(map(len, ps))
        chunks.append("".join("\n\n".join(paras[i:i + 40]) + "\n<|endoftext|>\n" for i in range(0, len(paras), 40)).encode())
    n, i = 0, 0
    with open(path, "wb") as f:
        while n < nbytes:
            c = chunks[i % len(chunks)]; i += 1
            if nbytes - n < len(c): c = c[:c.rfind(b"\n", 0, int(nbytes - n)) + 1]  # the last one ends at a line end
            if not c: break
            f.write(c); n += len(c)
    return n


def bench_preprocess(a, root: Path) -> dict:
    raw, out = root/"raw", root/"processed"; raw.mkdir()
    t0 = time.perf_counter(); n = write_text(raw/"big.txt", a.gb * 1e9)
    print(f"(a) wrote {n / 1e9:.2f} GB of generated text in {time.perf_counter() - t0:.0f} s: {raw/'big.txt'}")
    exe = Path(sys.executable).parent/"lp_preprocess"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from llm_playground.preprocess import main; main()"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, f"input_dir={raw}", f"out_dir={out}", f"tokenizer={a.tokenizer}", "preprocessing.progress=false",
                        *a.overrides],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if r.returncode: sys.exit(f"lp_preprocess failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    m = json.loads((out/"manifest.json").read_text())
    res = {"input_gb": n / 1e9, "wall_s": wall, "mb_per_s": n / 1e6 / wall, "peak_rss_mb": peak / 1024,
           "peak_rss_note": None if peak > before else "not above an earlier child's peak", "tokens": m["totals"]["tokens"],
           "documents": m["totals"]["documents"], "out_gb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e9}
    print(f"(a) lp_preprocess: {res['input_gb']:.2f} GB in {wall:.0f} s = {res['mb_per_s']:.1f} MB/s, peak RSS {res['peak_rss_mb']:,.0f} MB; "
          f"{sum(res['tokens'].values()):,} tokens ({res['tokens']['validation']:,} validation), outputs {res['out_gb']:.2f} GB")
    print("\n".join("    " + line for line in r.stdout.strip().splitlines()))
    if not a.keep: shutil.rmtree(raw); shutil.rmtree(out)
    return res


def write_shards(folder: Path, tokens: int, shards: int, seed: int = 0):
    "`tokens` random GPT-2 ids as `shards` uint16 `.bin` files, written 10M at a time."
    rng, per = np.random.default_rng(seed), -(-tokens // shards)
    for i in range(shards):
        with open(folder/f"shard_{i:03d}.bin", "wb") as f:
            left = min(per, tokens - i * per)
            while left > 0:
                k = min(left, 10_000_000); f.write(rng.integers(0, 50257, k, dtype=np.uint16).tobytes()); left -= k


def bench_data(a, root: Path) -> dict:
    from llm_playground.dataloader import NextTokenPredictionDataset, create_dataloader
    import torch
    folder = root/"bins"; folder.mkdir()
    t0 = time.perf_counter(); write_shards(folder, int(a.tokens), a.shards)
    print(f"(b) wrote {int(a.tokens):,} random uint16 tokens in {a.shards} shards ({int(a.tokens) * 2 / 1e9:.1f} GB) "
          f"in {time.perf_counter() - t0:.0f} s")
    reset_peak(); res = {"start": rss()}
    ds = NextTokenPredictionDataset(folder, max_length=a.context, stride=a.stride); res["dataset"] = rss()
    dl = create_dataloader(ds, batch_size=a.batch_size, shuffle=True, num_workers=0); res["loader"] = rss()
    print(f"(b) {ds}; RSS at start: {fmt(res['start'])}\n    after the dataset: {fmt(res['dataset'])}\n    after the loader: {fmt(res['loader'])}")
    it = iter(dl)
    t0 = time.perf_counter(); first = next(it); t_first = time.perf_counter() - t0; res["first_batch"] = rss()
    t0 = time.perf_counter()
    for _ in range(a.batches - 1): last = next(it)
    wall = time.perf_counter() - t0
    res["after_batches"] = rss(); res["peak"] = status_mb("VmHWM")["VmHWM"]
    res.update(first_batch_s=t_first, batches=a.batches, batches_per_s=(a.batches - 1) / wall, windows=len(ds),
               tokens_per_s=(a.batches - 1) * a.batch_size * a.context / wall)
    print(f"    after the first batch ({t_first:.2f} s): {fmt(res['first_batch'])}\n"
          f"    after {a.batches} batches: {fmt(res['after_batches'])}; peak RSS of this phase {res['peak']:,.0f} MB\n"
          f"    {res['batches_per_s']:,.0f} batches/s ({res['tokens_per_s'] / 1e6:.1f} M tokens/s) of {tuple(first[0].shape)}")
    state = dl.state_dict()
    ahead = [next(it) for _ in range(3)]
    dl2 = create_dataloader(ds, batch_size=a.batch_size, shuffle=True, num_workers=0)
    t0 = time.perf_counter(); dl2.load_state_dict(state); it2 = iter(dl2); again = [next(it2) for _ in range(3)]
    t_resume = time.perf_counter() - t0
    same = all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(ahead, again))
    res.update(resume={"state": state, "same_batches": same, "seconds": t_resume}, after_resume=rss())
    print(f"    resume at {state}: the next 3 batches {'equal' if same else 'DIFFER FROM'} the first loader's "
          f"({t_resume:.2f} s to resume and read them); RSS {fmt(res['after_resume'])}")
    del it, it2, dl, dl2, ds
    if not a.keep: shutil.rmtree(folder)
    if not same: sys.exit("resume gave other batches")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="size of the text file for lp_preprocess, GB (default 2)")
    ap.add_argument("--tokens", type=float, default=2e9, help="tokens of the .bin set (default 2e9)")
    ap.add_argument("--shards", type=int, default=20, help=".bin files (default 20)")
    ap.add_argument("--batches", type=int, default=2000, help="batches to iterate (default 2000)")
    ap.add_argument("--batch-size", type=int, default=8); ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=None, help="window stride (default: the context, no overlap)")
    ap.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bpe"], help="tokenizer of lp_preprocess (bpe: trained on the training split)")
    ap.add_argument("--overrides", nargs="*", default=[], help="more Hydra overrides for lp_preprocess, e.g. tokenizer.vocab_size=400 "
                    "(the generated text has few distinct words: a BPE on it learns at most a few hundred tokens)")
    ap.add_argument("--parts", nargs="+", default=["preprocess", "data"], choices=["preprocess", "data"])
    ap.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files (their folder is printed)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lp_scale_", dir=a.dir))
    free = shutil.disk_usage(root).free / 1e9
    need = (3.5 * a.gb if "preprocess" in a.parts else 0) + (2 * a.tokens / 1e9 if "data" in a.parts else 0)
    print(f"temporary folder {root}: {free:.0f} GB free, about {need:.1f} GB needed")
    if need > 0.9 * free: sys.exit(f"not enough free disk in {root.parent} ({free:.1f} GB for {need:.1f} GB): lower --gb/--tokens or use --dir")
    res = {"cpus": os.cpu_count(), "args": vars(a)}
    try:
        if "preprocess" in a.parts: res["preprocess"] = bench_preprocess(a, root)
        if "data" in a.parts: res["data"] = bench_data(a, root)
    finally:
        if not a.keep: shutil.rmtree(root, ignore_errors=True)
        else: print(f"kept: {root}")
    if a.json: Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
