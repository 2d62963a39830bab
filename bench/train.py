"""Training throughput and model FLOPs utilisation (MFU) of a 6-layer, 384-wide GPT-2 at context 256.

Compares, in the same run and on the same model: llm_playground's `Trainer` (default callbacks: metrics, evaluation
and sampling hooks, checkpoint hook, no progress bar) against a bare PyTorch loop doing the same work (AdamW over the
same parameter groups, the same schedule, gradient clipping, autocast), each in fp32 and in bf16 autocast.
The two loops run in alternating rounds so that a change of machine load hits both alike; per-step times are medians.
MFU = tokens/s x training FLOPs per token (`Transformer.flops_per_token`) / the matmul peak measured in this run for
the same precision.

Variants of the Trainer (`--variants`) run in the same alternation, to measure each speed trick on its own:
`plain-loss` (trainer.fused_loss=false: the full logits and F.cross_entropy), `foreach-adamw` (optimiser.fused=false).
Peak RSS is not measured here (all loops share one process); `--nanogpt` measures it per process.

`--nanogpt` instead runs karpathy/nanoGPT's train.py (NANOGPT_DIR: a checkout) against lp_pretrain through
../shared/bench/train_vs_nanogpt.py (BENCH_HARNESS overrides its path), in the same alternating rounds, and adds the
peak RSS of every process (ru_maxrss from wait4) to its results. `--lp` passes extra lp_pretrain overrides.
`--profile` prints where one Trainer step spends its time (torch.profiler, self CPU time by op).
`--overhead` measures the Trainer's own cost per step in ms (against the bare loop on a tiny model) and its share of
a step of the shape above.

usage: python bench/train.py [--steps 6] [--rounds 2] [--batch 4] [--device auto] [--precisions fp32,bf16]
           [--variants plain-loss,foreach-adamw] [--profile] [--shape issue|gpt2] [--peak-tflops 989]
       python bench/train.py --overhead
       NANOGPT_DIR=/work/nanoGPT python bench/train.py --nanogpt [--iters 12] [--rounds 2] [--lp "model.vocab_size=50304"]
"""
import argparse, functools, importlib.util, math, os, statistics, subprocess, sys, tempfile, time, types
from pathlib import Path

import torch

from llm_playground.config import get_device, seed_everything
from llm_playground.optimiser import create_optimiser, create_scheduler
from llm_playground.trainer import Callback, Trainer, fused_lm_loss
from llm_playground.transformer import Transformer


def matmul_peak(device, dtype, n=None, seconds=2.0) -> float:
    "Measured FLOP/s of square matmuls of size n in `dtype` (the best of several timed bursts; n: 1024 on CPU, 8192 on a GPU)."
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3): a @ b
    sync(); best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4): a @ b
        sync(); best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


class StepTimes(Callback):
    "Record the wall-clock time of each optimiser step."
    order = 1000
    def __init__(self): self.times = []
    def before_step(self, t): self.t0 = time.perf_counter()
    def after_step(self, t):
        if t.device.type == "cuda": torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)


SHAPE = dict(vocab_size=50257, context_length=256, emb_dim=384, n_layers=6, n_heads=6)  # the issue's shape
SHAPES = dict(issue=SHAPE, gpt2=dict(vocab_size=50304, context_length=1024, emb_dim=768, n_layers=12, n_heads=12))  # --shape (gpt2: 124M, a GPU's)
TINY = dict(vocab_size=512, context_length=32, emb_dim=32, n_layers=1, n_heads=2)  # --overhead: almost no compute per step


def make_model(seed=0, shape=None):
    torch.manual_seed(seed)
    return Transformer(**(shape or SHAPE))


def batches(n, batch, device, seed=0, shape=None):
    g, c = torch.Generator().manual_seed(seed), shape or SHAPE
    return [(torch.randint(0, c["vocab_size"], (batch, c["context_length"]), generator=g),) * 2 for _ in range(n)]


VARIANTS = {"plain-loss": (dict(fused_loss=False), {}), "foreach-adamw": ({}, dict(fused=False))}  # name -> trainer, optimiser overrides


def bench(precision, args, device, shape=None):
    variants = [v for v in args.variants.split(",") if v]
    total = args.rounds * args.steps * (2 + len(variants)) + 2 + len(variants)
    data = batches(total, args.batch, device, shape=shape)
    make_model = functools.partial(globals()["make_model"], shape=shape)
    cfg = dict(device=str(device), precision=precision, max_steps=10**9, progress=False, plot=False, log_steps=10, eval_steps=0,
               save_steps=0, sampling=dict(prompts=[], every_epoch=False))
    # the Trainer: default callbacks, no run directory (nothing written), no validation data
    timer = StepTimes()
    t = Trainer(make_model(), data, cfg=cfg, cbs=[timer])
    others = {v: (Trainer(make_model(), data, cfg={**cfg, **VARIANTS[v][0]}, opt_cfg=VARIANTS[v][1], cbs=[StepTimes()])) for v in variants}
    # the bare loop: same model, same optimiser groups, schedule, clipping and autocast
    model = make_model().to(device)
    opt = create_optimiser(model, None); sched = create_scheduler(opt, total)
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(t.precision)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bare_times, it = [], iter(data)
    def bare_steps(k):
        for _ in range(k):
            xb, yb = next(it)
            t0 = time.perf_counter()
            xb, yb = xb.to(device), yb.to(device)
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = fused_lm_loss(model.hidden_states(xb), model.head.weight, yb)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); opt.zero_grad(set_to_none=True); sched.step()
            loss.item(); sync()
            bare_times.append(time.perf_counter() - t0)
    def trainer_steps(k, tr=t):
        tr.total_steps = tr.step + k; tr.fit()
    loops = [bare_steps, trainer_steps] + [functools.partial(trainer_steps, tr=o) for o in others.values()]
    for f in loops: f(1)  # warm-up
    bare_times.clear(); timer.times.clear()
    for o in others.values(): o.cbs[-1].times.clear()
    for r in range(args.rounds):
        for f in (loops if r % 2 == 0 else loops[::-1]): f(args.steps)
    if args.profile: profile_step(t)
    extra = {v: statistics.median(o.cbs[-1].times) for v, o in others.items()}
    return statistics.median(bare_times), statistics.median(timer.times), t.model.flops_per_token((shape or SHAPE)["context_length"]), t.precision, extra


def profile_step(t, rows=int(os.environ.get("PROFILE_ROWS", 12))):
    "Print the ops one Trainer step spends its time on (self CPU time)."
    from torch.profiler import profile
    with profile() as prof: t.total_steps = t.step + 1; t.fit()
    print(f"\n[{t.precision}] one Trainer step, by op:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _harness():
    "The shared side-by-side harness (../shared/bench/train_vs_nanogpt.py), imported as a module."
    path = Path(os.environ.get("BENCH_HARNESS", Path(__file__).resolve().parents[2]/"shared"/"bench"/"train_vs_nanogpt.py"))
    if not path.exists(): sys.exit(f"bench/train.py: error: no harness at {path}: set BENCH_HARNESS to train_vs_nanogpt.py")
    spec = importlib.util.spec_from_file_location("train_vs_nanogpt", path)
    h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)
    return h


def _run_measured(peaks):
    "A `subprocess.run` that also records each child's peak RSS (bytes, from wait4) in `peaks`, keyed by program."
    def run(cmd, capture_output=False, text=False, check=False, cwd=None, **kw):
        with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
            out = dict(stdout=fo, stderr=fe) if capture_output else {}
            p = subprocess.Popen(cmd, cwd=cwd, **out, **kw)
            _, status, ru = os.wait4(p.pid, 0)
            rc = os.waitstatus_to_exitcode(status); p.returncode = rc
            key = "nano" if "--child" in cmd else Path(cmd[0]).name
            peaks.setdefault(key, []).append(ru.ru_maxrss * 1024)
            if check and rc: raise subprocess.CalledProcessError(rc, cmd)
            rd = lambda f: (f.seek(0), f.read().decode() if text else f.read())[1] if capture_output else None
            return subprocess.CompletedProcess(cmd, rc, rd(fo), rd(fe))
    return run


def nanogpt(args):
    "lp_pretrain against nanoGPT's train.py through the shared harness, with the peak RSS of every run."
    h, peaks = _harness(), {}
    h.subprocess = types.SimpleNamespace(run=_run_measured(peaks), CalledProcessError=subprocess.CalledProcessError)
    argv = ["train_vs_nanogpt.py", "--iters", str(args.iters), "--rounds", str(args.rounds), "--variants", args.nano_variants]
    if args.lp: argv += ["--lp", args.lp]
    sys.argv, rss = argv, {}
    orig_nano, orig_lp = h.run_nano, h.run_lp
    def nano(nano_dir, nd, work, iters, autocast):
        n = len(peaks.get("nano", [])); r = orig_nano(nano_dir, nd, work, iters, autocast)
        rss.setdefault("nano-" + ("bf16" if autocast else "fp32"), []).extend(peaks["nano"][n:]); return r
    def lp(data, work, iters, precision, extra):
        n = len(peaks.get("lp_pretrain", [])); r = orig_lp(data, work, iters, precision, extra)
        rss.setdefault("lp-" + precision, []).extend(peaks["lp_pretrain"][n:]); return r
    h.run_nano, h.run_lp = nano, lp
    h.main()
    base = max(rss.get("nano-fp32", [0]))
    for v, xs in rss.items():
        print(f"PEAK_RSS {v}: {max(xs) / 2**30:.2f} GiB" + (f", {max(xs) / base:.2f}x nano-fp32" if base else ""))


def overhead(args):
    """The Trainer's bookkeeping per step (callbacks, divergence guard, clock, metrics), in milliseconds: its step time minus
    the bare loop's on a 1-layer, 32-wide model, where compute is a fraction of a millisecond; then that cost as a
    share of a bare step of the issue's shape (6 x 384, context 256), measured in the same run."""
    device = get_device(args.device)
    a = argparse.Namespace(**{**vars(args), "variants": "", "rounds": max(args.rounds, 4), "steps": max(args.steps, 100)})
    bare, trainer, *_ = bench("fp32", a, device, shape=TINY)
    big = argparse.Namespace(**{**vars(args), "variants": "", "rounds": 1, "steps": 3})
    big_bare, *_ = bench("auto", big, device)
    ms = 1000 * (trainer - bare)
    print(f"tiny model ({a.rounds} rounds x {a.steps} steps): bare loop {1000 * bare:.2f} ms/step, Trainer {1000 * trainer:.2f} ms/step: "
          f"the Trainer's own cost {ms:.2f} ms/step")
    print(f"issue's shape, bare loop in {'bf16' if device.type == 'cpu' else 'auto precision'}: {big_bare:.3f} s/step, "
          f"so the Trainer adds {100 * ms / 1000 / big_bare:.2f}% to it")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per loop per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of bare loop / Trainer")
    p.add_argument("--batch", type=int, default=4, help="sequences of a context each per step")
    p.add_argument("--shape", default="issue", choices=list(SHAPES), help="issue: 6 x 384, context 256; gpt2: GPT-2 124M, context 1024")
    p.add_argument("--peak-tflops", type=float, default=None, help="also report MFU against this dense peak (e.g. 989 for an H100/H200 SXM in bf16)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--variants", default="plain-loss,foreach-adamw", help=f"Trainer variants to time too: {', '.join(VARIANTS)} (empty: none)")
    p.add_argument("--profile", action="store_true", help="print a profile of one Trainer step")
    p.add_argument("--nanogpt", action="store_true", help="compare lp_pretrain with nanoGPT (NANOGPT_DIR) instead")
    p.add_argument("--iters", type=int, default=12, help="--nanogpt: steps per run (the first 3 not timed)")
    p.add_argument("--nano-variants", default="nano-fp32,nano-bf16,lp-fp32,lp-bf16", help="--nanogpt: the harness's variants")
    p.add_argument("--lp", default="", help="--nanogpt: extra lp_pretrain overrides")
    p.add_argument("--overhead", action="store_true", help="the Trainer's own cost per step, in ms, on a model too small to hide it")
    args = p.parse_args()
    if args.nanogpt: return nanogpt(args)
    if args.overhead: return overhead(args)
    device = get_device(args.device)
    seed_everything(0)
    shape = SHAPES[args.shape]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; model {shape['n_layers']} layers x "
          f"{shape['emb_dim']}, context {shape['context_length']}, batch {args.batch} ({args.batch * shape['context_length']} tokens/step); "
          f"{args.rounds} rounds x {args.steps} steps per loop")
    rows = []
    for prec in args.precisions.split(","):
        peak = matmul_peak(device, torch.bfloat16 if prec == "bf16" else torch.float16 if prec == "fp16" else torch.float32)
        bare, trainer, fpt, resolved, extra = bench(prec, args, device, shape=shape)
        tok = args.batch * shape['context_length']
        for name, dt in (("bare loop", bare), ("Trainer", trainer), *extra.items()):
            tps = tok / dt
            rows.append((resolved, name, dt, tps, tps * fpt / peak, peak))
        print(f"[{resolved}] matmul peak {peak/1e9:.1f} GFLOP/s; Trainer overhead vs bare loop: {100 * (trainer / bare - 1):+.1f}%"
              + "".join(f"; {v}: {dt / trainer:.2f}x the Trainer's s/step" for v, dt in extra.items()))
    print(f"\n{'precision':<10}{'loop':<15}{'s/step':>8}{'tokens/s':>10}{'MFU':>8}{'peak GFLOP/s':>14}")
    for prec, name, dt, tps, mfu, peak in rows:
        print(f"{prec:<10}{name:<15}{dt:>8.3f}{tps:>10.0f}{100 * mfu:>7.1f}%{peak / 1e9:>14.1f}")
    if args.peak_tflops:
        for prec, name, dt, tps, mfu, peak in rows:
            print(f"{prec} {name}: MFU {100 * mfu * peak / (args.peak_tflops * 1e12):.1f}% of a {args.peak_tflops:g} TFLOP/s dense peak")
    by = {(r[0], r[1]): r[3] for r in rows}
    if ("fp32", "Trainer") in by and ("bf16", "Trainer") in by:
        print(f"\nbf16 autocast vs fp32 (Trainer): {by[('bf16', 'Trainer')] / by[('fp32', 'Trainer')]:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
