#!/usr/bin/env python
"""Generation benchmark: GPT-2 124M shape with random weights, greedy decoding.

Measures, in one run:
  * memory bandwidth (a big tensor copy) and the decode limit it implies: weight bytes / bandwidth per step;
  * tokens/s of `Transformer.generate` with the KV cache and without it (16-token prompts, 128 new tokens,
    batch 1 and 8), in fp32 and bf16;
  * the KV-cache speed-up at 256 new tokens;
  * Hugging Face transformers' `generate` on the same weights (greedy, use_cache=True), if transformers is installed,
    and whether both produce the same tokens.

Without a cache, a step reruns the whole sequence, so those runs are by far the slowest (minutes on a laptop CPU for
batch 8); by default they run at batch 1 only, `--nocache-batch` widens that.

usage: python bench/generate.py [--quick] [--threads N] [--device auto] [--dtypes fp32 bf16] [--batch-sizes 1 8] ...
"""
import argparse, json, platform, sys, time, warnings

import torch

from llm_playground.config import get_device
from llm_playground.transformer import Transformer, model_preset   # importing Transformer is enough to generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


def timed(f, device):
    "Run `f()` once; return (result, seconds)."
    sync(device); t = time.perf_counter()
    out = f()
    sync(device)
    return out, time.perf_counter() - t


def bandwidth_gbs(device, mb=512, repeats=5):
    "Memory bandwidth in GB/s from copying a `mb` MiB tensor (read + write counted)."
    src = torch.ones(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: touch the pages
    best = float("inf")
    for _ in range(repeats):
        _, s = timed(lambda: dst.copy_(src), device)
        best = min(best, s)
    return 2 * src.nbytes / best / 1e9


def weight_bytes(model):
    "Bytes of the parameters a decode step must read (tied tensors counted once)."
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_models(device, seed, want_hf):
    "Our GPT-2 124M with random weights, and (if available) a Hugging Face GPT2LMHeadModel holding the same weights."
    cfg = model_preset("gpt2_124m")
    hf = None
    if want_hf:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import transformers
                from transformers import GPT2Config, GPT2LMHeadModel
                transformers.logging.set_verbosity_error()
        except Exception as e:  # not installed, or broken against this torch
            print(f"# Hugging Face transformers not available ({type(e).__name__}: {e}); skipping the comparison")
        else:
            torch.manual_seed(seed)
            hcfg = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
                              n_layer=cfg["n_layers"], n_head=cfg["n_heads"])
            hf = GPT2LMHeadModel(hcfg).eval()
            hf.generation_config.eos_token_id = None   # random weights: never stop early
            hf.generation_config.pad_token_id = 0
            print(f"# transformers {transformers.__version__}")
    if hf is not None:
        ours = Transformer.from_hf(hf.state_dict(), n_heads=cfg["n_heads"]).eval()
    else:
        torch.manual_seed(seed)
        ours = Transformer.from_preset("gpt2_124m").eval()
    return ours.to(device), (hf.to(device) if hf is not None else None)


def interleaved(fns, device, repeat):
    "Time each of `fns` (name -> function) `repeat` times, taking turns (fair on a busy machine); best time of each."
    outs, best = {}, {k: float("inf") for k in fns}
    for _ in range(max(repeat, 1)):
        for k, f in fns.items():
            outs[k], s = timed(f, device)
            best[k] = min(best[k], s)
    return outs, best


def ours_fn(model, prompts, n, use_cache=True):
    return lambda: model.generate(prompts, n, temperature=0, use_cache=use_cache)


def hf_fn(hf, prompts, n):
    am = torch.ones_like(prompts)
    return lambda: hf.generate(prompts, attention_mask=am, max_new_tokens=n, do_sample=False,
                               use_cache=True)[:, prompts.shape[1]:].tolist()


def run_ours(model, prompts, n, use_cache, device):
    return timed(ours_fn(model, prompts, n, use_cache), device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke test: 16 new tokens (32 for the speed-up), fp32 only")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--long-new-tokens", type=int, default=256, help="new tokens for the cache speed-up measurement")
    ap.add_argument("--nocache-batch", type=int, default=1, help="largest batch size measured without the cache")
    ap.add_argument("--repeat", type=int, default=3, help="cached runs (ours and HF, taking turns) are timed this many times, best kept")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args(argv)
    if a.quick: a.new_tokens, a.long_new_tokens, a.dtypes, a.repeat = 16, 32, ["fp32"], 1
    t0 = time.perf_counter()
    if a.threads: torch.set_num_threads(a.threads)
    device = get_device(a.device)
    warnings.simplefilter("ignore", UserWarning)

    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
          f"{torch.get_num_threads()} threads")
    bw = bandwidth_gbs(device)
    print(f"# memory bandwidth (copy): {bw:.1f} GB/s")
    base, hf_base = build_models(device, a.seed, not a.no_hf)
    results = dict(device=str(device), threads=torch.get_num_threads(), bandwidth_gbs=bw, runs=[])
    g = torch.Generator().manual_seed(a.seed)

    hdr = f"{'dtype':5} {'batch':>5} {'new':>4}  {'impl':<16} {'tok/s':>8} {'s':>7}  {'limit tok/s':>11}  note"
    print(hdr); print("-" * len(hdr))

    def report(dtype, B, n, impl, toks, secs, limit, note=""):
        tps = B * n / secs
        results["runs"].append(dict(dtype=dtype, batch=B, new_tokens=n, impl=impl, tokens_per_s=tps, seconds=secs,
                                    limit_tokens_per_s=limit, note=note))
        print(f"{dtype:5} {B:5d} {n:4d}  {impl:<16} {tps:8.1f} {secs:7.2f}  {limit:11.1f}  {note}", flush=True)
        return tps

    for dname in a.dtypes:
        dt = DTYPES[dname]
        model = base.to(dt)
        hf = hf_base.to(dt) if hf_base is not None else None
        wb = weight_bytes(model)
        print(f"# {dname}: weights {wb / 2**20:.0f} MiB -> decode limit {bw * 1e9 / wb:.1f} steps/s")
        for B in a.batch_sizes:
            prompts = torch.randint(0, model.cfg.vocab_size, (B, a.prompt_len), generator=g).to(device)
            limit = B * bw * 1e9 / wb
            fns = {"ours": ours_fn(model, prompts, a.new_tokens)}
            if hf is not None: fns["HF"] = hf_fn(hf, prompts, a.new_tokens)
            interleaved({k: (ours_fn(model, prompts, 4) if k == "ours" else hf_fn(hf, prompts, 4)) for k in fns},
                        device, 1)                                          # warm-up
            outs, secs = interleaved(fns, device, a.repeat)
            ref = outs["ours"]
            report(dname, B, a.new_tokens, "ours, cache", ref, secs["ours"], limit)
            if hf is not None:
                same = sum(x == y for r, o in zip(ref, outs["HF"]) for x, y in zip(r, o))
                report(dname, B, a.new_tokens, "HF, cache", outs["HF"], secs["HF"], limit,
                       f"same tokens as ours: {same}/{B * a.new_tokens}; ours/HF speed {secs['HF'] / secs['ours']:.2f}x")
            if B <= a.nocache_batch:
                out, s = run_ours(model, prompts, a.new_tokens, False, device)
                report(dname, B, a.new_tokens, "ours, no cache", out, s, limit,
                       f"same tokens as cached: {out == ref}")
        # the KV-cache speed-up on longer generations
        B = min(a.batch_sizes)
        prompts = torch.randint(0, model.cfg.vocab_size, (B, a.prompt_len), generator=g).to(device)
        limit = B * bw * 1e9 / wb
        ref, s1 = run_ours(model, prompts, a.long_new_tokens, True, device)
        t1 = report(dname, B, a.long_new_tokens, "ours, cache", ref, s1, limit)
        out, s2 = run_ours(model, prompts, a.long_new_tokens, False, device)
        t2 = report(dname, B, a.long_new_tokens, "ours, no cache", out, s2, limit, f"same tokens as cached: {out == ref}")
        print(f"# {dname}: KV-cache speed-up at {a.long_new_tokens} new tokens, batch {B}: {t1 / t2:.1f}x")
        results["runs"].append(dict(dtype=dname, batch=B, new_tokens=a.long_new_tokens, impl="speedup", value=t1 / t2))

    print(f"# total benchmark time {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f: json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
