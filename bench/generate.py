#!/usr/bin/env python
"""Generation benchmark: GPT-2 124M shape with random weights, greedy decoding, ours against Hugging Face transformers.

Measures, in one run:
  * memory bandwidth (reading and copying a big tensor) and, for each way of storing the weights, the decode limit it
    implies: a step reads every weight once, so steps/s <= bandwidth / bytes a step reads;
  * tokens/s of `Transformer.generate` (KV cache, 16-token prompts, batch 1 and 8) with fp32 weights, bf16 weights,
    weight-only int8 (`quantize_int8`) and int8 with dynamically quantised activations (`quantize_int8(dynamic=True)`),
    and of Hugging Face transformers' `generate` on the same weights in fp32 and bf16 (greedy, use_cache=True);
    every configuration is timed in turns, round after round (fair on a busy machine), and the median is reported with
    the spread, then the ratio to transformers fp32;
  * whether our fp32 tokens equal transformers' fp32 tokens, and how many tokens the other formats share with them;
  * top-1 agreement of bf16 and int8 with fp32 under teacher forcing on real text (the repo's fixture chapter, GPT-2
    BPE): the random weights make this a lower bound (their logits are nearly flat, so near-ties flip easily);
  * the KV-cache speed-up (fp32, batch 1), unless --quick;
  * with --threads 1 2, every implementation at each thread count, in the same rounds;
  * with --profile, where a decode step spends its time (torch.profiler), ours in each format and transformers fp32.

usage: python bench/generate.py [--quick] [--threads 1 2] [--device auto] [--configs fp32 bf16 int8 int8dyn]
       [--batch-sizes 1 8] [--repeat 5] [--new-tokens 32] [--profile] [--json out.json]
"""
import argparse, copy, json, platform, statistics, sys, time, warnings
from unittest import mock
from pathlib import Path

import torch
from torch import nn

from llm_playground import inference_utils
from llm_playground.config import get_device
from llm_playground.inference_utils import quantize_int8, top1_agreement
from llm_playground.transformer import Transformer, model_preset   # importing Transformer is enough to generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIGS = ["fp32", "fp32-plain", "bf16", "int8", "int8dyn"]   # fp32-plain: fp32 without the [in, out] weight layout
TEXT = Path(__file__).resolve().parent.parent / "data" / "fixtures" / "pride_and_prejudice_ch1.txt"


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


def timed(f, device):
    "Run `f()` once; return (result, seconds)."
    sync(device); t = time.perf_counter()
    out = f()
    sync(device)
    return out, time.perf_counter() - t


def bandwidth_gbs(device, mb=512, repeats=5):
    "Memory bandwidth in GB/s: (reading a `mb` MiB tensor, copying it with read + write counted); best of `repeats`."
    src = torch.ones(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: touch the pages
    read = copy = float("inf")
    for _ in range(repeats):
        read = min(read, timed(lambda: src.sum(), device)[1])
        copy = min(copy, timed(lambda: dst.copy_(src), device)[1])
    return src.nbytes / read / 1e9, 2 * src.nbytes / copy / 1e9


def step_bytes(model):
    "Bytes a decode step must read: every weight and buffer once (tied tensors once), embedding tables excepted (one row each)."
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Embedding): continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr()); n += t.numel() * t.element_size()
    return n


def hf_model(cfg, seed):
    "A Hugging Face GPT2LMHeadModel of the GPT-2 124M shape with random weights, or None if transformers is unusable."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import transformers
            from transformers import GPT2Config, GPT2LMHeadModel
            transformers.logging.set_verbosity_error()
    except Exception as e:  # not installed, or broken against this torch
        print(f"# Hugging Face transformers not available ({type(e).__name__}: {e}); skipping the comparison")
        return None
    torch.manual_seed(seed)
    hcfg = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
                      n_layer=cfg["n_layers"], n_head=cfg["n_heads"])
    hf = GPT2LMHeadModel(hcfg).eval()
    hf.generation_config.eos_token_id = None   # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    print(f"# transformers {transformers.__version__}")
    return hf


def build_models(device, seed, want_hf, configs):
    "Our models (name -> model) in the formats asked for, and HF models (name -> model) holding the same weights."
    cfg = model_preset("gpt2_124m")
    hf = hf_model(cfg, seed) if want_hf else None
    if hf is not None: base = Transformer.from_hf(hf.state_dict(), n_heads=cfg["n_heads"]).eval()
    else:
        torch.manual_seed(seed)
        base = Transformer.from_preset("gpt2_124m").eval()
    base = base.to(device)
    fmts = {"fp32": lambda: base, "fp32-plain": lambda: base, "bf16": lambda: copy.deepcopy(base).to(torch.bfloat16),
            "int8": lambda: quantize_int8(base), "int8dyn": lambda: quantize_int8(base, dynamic=True)}
    ours = {c: fmts[c]() for c in configs}
    hfs = {}
    if hf is not None:
        hfs["fp32"] = hf.to(device)
        if "bf16" in configs: hfs["bf16"] = copy.deepcopy(hf).to(device, torch.bfloat16)
    return base, ours, hfs


def ours_fn(model, prompts, n, use_cache=True, plain=False):
    "Greedy `generate`; `plain`: with the decode loop's weight-layout trick switched off (its measured effect)."
    def f():
        if not plain: return model.generate(prompts, n, temperature=0, use_cache=use_cache)
        with mock.patch.object(inference_utils, "_decode_model", lambda m: m):
            return model.generate(prompts, n, temperature=0, use_cache=use_cache)
    return f


def hf_fn(hf, prompts, n):
    am = torch.ones_like(prompts)
    return lambda: hf.generate(prompts, attention_mask=am, max_new_tokens=n, do_sample=False,
                               use_cache=True)[:, prompts.shape[1]:].tolist()


def with_threads(f, n):
    "`f` run with `n` torch threads (set before each call, so implementations can take turns with different settings)."
    def g():
        torch.set_num_threads(n)
        return f()
    return g


def rounds(fns, device, repeat):
    "Time each of `fns` (name -> function) `repeat` times, taking turns; return outputs and the list of times of each."
    outs, secs = {}, {k: [] for k in fns}
    for _ in range(max(repeat, 1)):
        for k, f in fns.items():
            outs[k], s = timed(f, device)
            secs[k].append(s)
    return outs, secs


def same_tokens(a, b): return sum(x == y for r, o in zip(a, b) for x, y in zip(r, o))


def profile_step(model, prompts, n, label):
    "Print where `n` greedy decode steps of `model` spend their time (torch.profiler, self CPU time, top ops)."
    from torch.profiler import ProfilerActivity, profile
    model.generate(prompts, 2, temperature=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.generate(prompts, n, temperature=0)
    print(f"# profile, {label}, {n} steps (prefill included):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke test: 8 new tokens, batch 1, one round, fp32 and int8")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch CPU threads; several values are all measured in the same rounds (default: torch's choice)")
    ap.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "fp32-plain"], choices=CONFIGS,
                    help="our weight formats to measure")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--long-new-tokens", type=int, default=256, help="new tokens for the cache speed-up measurement (0: skip)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds: every configuration is timed once per round, in turns")
    ap.add_argument("--agree-tokens", type=int, default=512, help="tokens of real text for the top-1 agreement (0: skip)")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler summary of decoding per format")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args(argv)
    if a.quick:
        a.new_tokens, a.long_new_tokens, a.repeat, a.agree_tokens, a.batch_sizes = 8, 0, 1, 128, [1]
        a.configs = [c for c in a.configs if c in ("fp32", "int8")] or ["fp32"]
    t0 = time.perf_counter()
    threads = a.threads or [torch.get_num_threads()]
    torch.set_num_threads(max(threads))
    device = get_device(a.device)
    warnings.simplefilter("ignore", UserWarning)

    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
          f"threads {threads}, load average {' '.join(Path('/proc/loadavg').read_text().split()[:3]) if Path('/proc/loadavg').exists() else '?'}")
    bw, bw_copy = bandwidth_gbs(device)
    print(f"# memory bandwidth: read {bw:.1f} GB/s, copy {bw_copy:.1f} GB/s (read + write); limits below use the best "
          f"read bandwidth of this measurement and the ones between batch sizes (others' load lowers it)")
    base, ours, hfs = build_models(device, a.seed, not a.no_hf, a.configs)
    fp32_bytes = step_bytes(base)
    results = dict(device=str(device), threads=torch.get_num_threads(), bandwidth_read_gbs=bw, bandwidth_copy_gbs=bw_copy,
                   repeat=a.repeat, runs=[], agreement={})
    for name, m in ours.items():
        sb = step_bytes(m)
        print(f"# ours {name:10}: a step reads {sb / 2**20:5.0f} MiB -> limit {bw * 1e9 / sb:6.1f} steps/s at {bw:.1f} GB/s")
        results[f"step_bytes_{name}"] = sb
    g = torch.Generator().manual_seed(a.seed)

    hdr = (f"{'impl':<18} {'batch':>5} {'new':>4} {'tok/s':>8} {'min-max tok/s':>15} {'limit':>7} {'of limit':>8} "
           f"{'vs HF fp32':>10} {'vs HF same':>10}  tokens")
    print(hdr); print("-" * len(hdr))
    for B in a.batch_sizes:
        bw = max(bw, bandwidth_gbs(device)[0]); results["bandwidth_read_gbs"] = bw
        prompts = torch.randint(0, 50257, (B, a.prompt_len), generator=g).to(device)
        def make(n):   # name -> function, for each implementation and thread count
            f = {f"ours {k}": ours_fn(m, prompts, n, plain=k == "fp32-plain") for k, m in ours.items()}
            f |= {f"HF {k}": hf_fn(m, prompts, n) for k, m in hfs.items()}
            return {f"{k}@{th}" if len(threads) > 1 else k: with_threads(fn, th) for th in threads for k, fn in f.items()}
        rounds(make(2), device, 1)                                                 # warm-up
        fns = make(a.new_tokens)
        outs, secs = rounds(fns, device, a.repeat)
        torch.set_num_threads(max(threads))
        tps = {k: [B * a.new_tokens / s for s in v] for k, v in secs.items()}
        med = {k: statistics.median(v) for k, v in tps.items()}
        first = lambda name: next((v for j, v in outs.items() if j.split("@")[0] == name), None)
        ref = first("HF fp32") or first("ours fp32")
        for k in fns:
            kind, fmt = k.split()
            fmt = fmt.split("@")[0]
            sb = step_bytes(ours[fmt]) if kind == "ours" else fp32_bytes // (1 if fmt == "fp32" else 2)
            limit = B * bw * 1e9 / sb
            hf32 = max((v for j, v in med.items() if j.startswith("HF fp32")), default=float("nan"))   # HF's best thread setting
            vs_fp32 = med[k] / hf32
            same_fmt = f"HF {fmt if fmt in hfs else 'fp32'}"   # int8 against HF fp32: HF has no int8 of its own here
            same_fmt = max((j for j in med if j.split("@")[0] == same_fmt), key=med.get, default=same_fmt)
            vs_same = med[k] / med[same_fmt] if same_fmt in med else float("nan")
            same = same_tokens(outs[k], ref)
            print(f"{k:<18} {B:5d} {a.new_tokens:4d} {med[k]:8.1f} {min(tps[k]):7.1f}-{max(tps[k]):<7.1f} {limit:7.1f} "
                  f"{med[k] / limit:8.0%} {vs_fp32:9.2f}x {vs_same:9.2f}x  {same}/{B * a.new_tokens} as "
                  f"{'HF fp32' if first('HF fp32') is not None else 'ours fp32'}", flush=True)
            results["runs"].append(dict(impl=k, batch=B, new_tokens=a.new_tokens, tokens_per_s=med[k],
                                        tokens_per_s_all=tps[k], limit_tokens_per_s=limit, vs_hf_fp32=vs_fp32,
                                        vs_hf_same_dtype=vs_same, same_tokens_as_ref=same))
        if first("HF fp32") is not None and first("ours fp32") is not None:
            eq = all(v == first("HF fp32") for j, v in outs.items() if j.split("@")[0] == "ours fp32")
            print(f"# batch {B}: ours fp32 greedy tokens {'==' if eq else '!='} transformers fp32 greedy tokens")
            results[f"fp32_tokens_equal_hf_batch{B}"] = eq

    if a.agree_tokens and "fp32" in ours:
        from llm_playground.tokenizer import GPT2Tokenizer
        ids = GPT2Tokenizer().encode(TEXT.read_text())[:a.agree_tokens]
        for k, m in ours.items():
            if k.startswith("fp32"): continue
            agree = top1_agreement(ours["fp32"], m, ids)
            results["agreement"][k] = agree
            print(f"# top-1 agreement with fp32, teacher forcing on {len(ids)} tokens of {TEXT.name}: {k} {agree:.1%}")

    if a.long_new_tokens and "fp32" in ours:       # the KV-cache speed-up on longer generations
        m, B = ours["fp32"], 1
        prompts = torch.randint(0, 50257, (B, a.prompt_len), generator=g).to(device)
        ref, s1 = timed(ours_fn(m, prompts, a.long_new_tokens, True), device)
        out, s2 = timed(ours_fn(m, prompts, a.long_new_tokens, False), device)
        print(f"# fp32: KV-cache speed-up at {a.long_new_tokens} new tokens, batch {B}: {s2 / s1:.1f}x "
              f"({B * a.long_new_tokens / s1:.1f} vs {B * a.long_new_tokens / s2:.1f} tok/s; same tokens: {out == ref})")
        results["runs"].append(dict(impl="speedup", batch=B, new_tokens=a.long_new_tokens, value=s2 / s1))

    if a.profile:
        prompts = torch.randint(0, 50257, (1, a.prompt_len), generator=g).to(device)
        for k, m in ours.items():
            if k != "fp32-plain": profile_step(m, prompts, 16, f"ours {k}, batch 1")
        if "fp32" in hfs:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof: hf_fn(hfs["fp32"], prompts, 16)()
            print("# profile, HF fp32, batch 1, 16 steps:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))

    print(f"# total benchmark time {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f: json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
