#!/usr/bin/env python3
"""Search for a time-to-quality recipe: train variants under one wall-clock budget and compare validation bits per byte.

The text (default: the packaged tiny-shakespeare) is split as nanoGPT's shakespeare_char/prepare.py splits it: the
first 90% is the training text (lp_preprocess makes its own train/validation split of it, for the run's progress
lines), the last 10% is held out and scored at the end with `lp_eval text=`, so every variant is measured on the same
bytes whatever its tokenizer. Each variant is a list of Hydra overrides on top of `experiment=cpu_speedrun` (or any
base given with --base); the data are prepared once per tokenizer setting and cached.

    python bench/speedrun.py --budget 45 "model.n_layers=4" "model.n_layers=6 model.emb_dim=192"
    python bench/speedrun.py --budget 45 --base smoke --variants-file my_variants.txt

Prints one row per variant (process wall-clock, optimiser steps, held-out bits per byte) and appends it as JSON to
<work>/results.jsonl. Run nothing else meanwhile: the budget is wall-clock, so a busy machine trains fewer steps.
"""
import argparse, hashlib, json, lzma, os, shlex, subprocess, sys, tempfile, time
from pathlib import Path


def split(text_path: Path, work: Path):
    text = text_path.read_text(encoding="utf-8"); n = len(text)
    raw = work / "raw"; raw.mkdir(parents=True, exist_ok=True)
    (raw / "train.txt").write_text(text[: int(n * 0.9)], encoding="utf-8")
    (work / "val.txt").write_text(text[int(n * 0.9):], encoding="utf-8")
    return raw, work / "val.txt"


def xz_conditional(train: bytes, val: bytes) -> float:
    xz = lambda b: len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))
    return 8 * (xz(train + val) - xz(train)) / len(val)


def run(*args, cwd):
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)


def prepare(work: Path, raw: Path, base: str, tok_overrides: list[str]) -> Path:
    from omegaconf import OmegaConf
    from llm_playground.config import compose_config
    composed = compose_config("preprocess", [f"experiment={base}", *tok_overrides])  # the key: what decides the data
    key = hashlib.sha1(OmegaConf.to_yaml({k: composed[k] for k in ("tokenizer", "preprocessing")}).encode()).hexdigest()[:10]
    out = work / f"data_{key}"
    if not (out / "manifest.json").exists():
        p = run("lp_preprocess", f"experiment={base}", f"input_dir={raw}", f"out_dir={out}", "preprocessing.progress=false",
                *tok_overrides, cwd=work)
        if p.returncode: sys.exit(f"lp_preprocess {' '.join(tok_overrides)} failed: {p.stderr.strip()[-800:]}")
    return out


def variant(work: Path, raw: Path, val: Path, base: str, overrides: list[str], budget: float, name: str):
    tok = [o for o in overrides if o.split("=")[0] == "tokenizer" or o.startswith(("tokenizer.", "preprocessing."))]
    overrides = [o for o in overrides if not o.startswith("preprocessing.")]  # lp_preprocess's only
    data = prepare(work, raw, base, tok)
    models = work / "models"
    t = time.perf_counter()
    p = run("lp_pretrain", f"experiment={base}", f"dataset.train={data}/train", f"dataset.validation={data}/validation",
            f"trainer.max_time={budget:g}", f"trainer.output_dir={models}", f"trainer.experiment_name={name}",
            "trainer.progress=false", "trainer.plot=false", *overrides, cwd=work)
    dt = time.perf_counter() - t
    if p.returncode: return dict(name=name, overrides=overrides, error=p.stderr.strip().splitlines()[-1:])
    run_dir = max((models / name).glob("*"), key=lambda d: d.stat().st_mtime)
    out = work / f"eval_{name}.json"
    e = run("lp_eval", f"checkpoint={run_dir}", f"text={val}", f"out={out}", "progress=false", cwd=work)
    if e.returncode: return dict(name=name, overrides=overrides, error=e.stderr.strip().splitlines()[-1:])
    res = json.loads(out.read_text())
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    last_step = max((m.get("step", 0) for m in metrics), default=0)
    s = run("lp_sample", f"checkpoint={run_dir}", "prompt='ROMEO:'", "max_new_tokens=60", "seed=0", cwd=work)
    return dict(name=name, overrides=overrides, budget=budget, wall_s=round(dt, 1), steps=last_step, bpb=res["bpb"],
                sample=s.stdout.strip()[-300:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help='one quoted string of overrides per variant ("" = the base as it is)')
    ap.add_argument("--variants-file", help="one variant per line (# comments allowed)")
    ap.add_argument("--budget", type=float, default=45.0, help="trainer.max_time of every variant, seconds")
    ap.add_argument("--base", default="cpu_speedrun", help="the experiment the overrides apply to")
    ap.add_argument("--text", default=None, help="the text (default: the packaged tiny-shakespeare)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lp_speedrun"))
    a = ap.parse_args()
    variants = list(a.variants)
    if a.variants_file: variants += [l.split("#")[0].strip() for l in Path(a.variants_file).read_text().splitlines() if l.split("#")[0].strip()]
    if not variants: variants = [""]
    if a.text is None:
        import llm_playground
        a.text = Path(llm_playground.__file__).parent / "data" / "tinyshakespeare.txt"
    work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    raw, val = split(Path(a.text), work)
    print(f"xz -9e conditional cost of the held-out text: {xz_conditional((raw / 'train.txt').read_bytes(), val.read_bytes()):.3f} bits/byte")
    print(f"{'bpb':>6} {'wall_s':>6} {'steps':>6}  overrides")
    for i, v in enumerate(variants):
        r = variant(work, raw, val, a.base, shlex.split(v), a.budget, f"v{int(time.time())}_{i}")
        with open(work / "results.jsonl", "a") as f: f.write(json.dumps(r) + "\n")
        if "error" in r: print(f"{'error':>6} {'':>6} {'':>6}  {v}: {r['error']}", flush=True)
        else: print(f"{r['bpb']:6.3f} {r['wall_s']:6.1f} {r['steps']:6d}  {v or '(base)'}", flush=True)


if __name__ == "__main__":
    main()
