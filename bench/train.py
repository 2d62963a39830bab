"""Training throughput and model FLOPs utilisation (MFU) of a 6-layer, 384-wide GPT-2 at context 256.

Compares, in the same run and on the same model: llm_playground's `Trainer` (default callbacks: metrics, evaluation
and sampling hooks, checkpoint hook, no progress bar) against a bare PyTorch loop doing the same work (AdamW over the
same parameter groups, the same schedule, gradient clipping, autocast), each in fp32 and in bf16 autocast.
The two loops run in alternating rounds so that a change of machine load hits both alike; per-step times are medians.
MFU = tokens/s x training FLOPs per token (`Transformer.flops_per_token`) / the matmul peak measured in this run for
the same precision.

usage: python bench/train.py [--steps 6] [--rounds 2] [--batch 4] [--device auto] [--precisions fp32,bf16]
"""
import argparse, math, statistics, time

import torch

from llm_playground.config import get_device, seed_everything
from llm_playground.optimiser import create_optimiser, create_scheduler
from llm_playground.trainer import Callback, Trainer, lm_loss
from llm_playground.transformer import Transformer


def matmul_peak(device, dtype, n=1024, seconds=2.0) -> float:
    "Measured FLOP/s of square matmuls of size n in `dtype` (the best of several timed bursts)."
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


def make_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(vocab_size=50257, context_length=256, emb_dim=384, n_layers=6, n_heads=6)


def batches(n, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50257, (batch, 256), generator=g),) * 2 for _ in range(n)]


def bench(precision, args, device):
    total = args.rounds * args.steps + 2
    data = batches(total, args.batch, device)
    cfg = dict(device=str(device), precision=precision, max_steps=10**9, progress=False, plot=False, log_steps=10, eval_steps=0,
               save_steps=0, sampling=dict(prompts=[], every_epoch=False))
    # the Trainer: default callbacks, no run directory (nothing written), no validation data
    timer = StepTimes()
    t = Trainer(make_model(), data, cfg=cfg, cbs=[timer])
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
                loss = lm_loss(model(xb), yb)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); opt.zero_grad(set_to_none=True); sched.step()
            loss.item(); sync()
            bare_times.append(time.perf_counter() - t0)
    def trainer_steps(k):
        t.total_steps = t.step + k; t.fit()
    bare_steps(1); trainer_steps(1)  # warm-up
    bare_times.clear(); timer.times.clear()
    for r in range(args.rounds):
        for f in ((bare_steps, trainer_steps) if r % 2 == 0 else (trainer_steps, bare_steps)): f(args.steps)
    return statistics.median(bare_times), statistics.median(timer.times), t.model.flops_per_token(256), t.precision


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per loop per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of bare loop / Trainer")
    p.add_argument("--batch", type=int, default=4, help="sequences of 256 tokens per step")
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default="fp32,bf16")
    args = p.parse_args()
    device = get_device(args.device)
    seed_everything(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; model 6 layers x 384, context 256, "
          f"batch {args.batch} ({args.batch * 256} tokens/step); {args.rounds} rounds x {args.steps} steps per loop")
    rows = []
    for prec in args.precisions.split(","):
        peak = matmul_peak(device, torch.bfloat16 if prec == "bf16" else torch.float16 if prec == "fp16" else torch.float32)
        bare, trainer, fpt, resolved = bench(prec, args, device)
        tok = args.batch * 256
        for name, dt in (("bare loop", bare), ("Trainer", trainer)):
            tps = tok / dt
            rows.append((resolved, name, dt, tps, tps * fpt / peak, peak))
        print(f"[{resolved}] matmul peak {peak/1e9:.1f} GFLOP/s; Trainer overhead vs bare loop: {100 * (trainer / bare - 1):+.1f}%")
    print(f"\n{'precision':<10}{'loop':<11}{'s/step':>8}{'tokens/s':>10}{'MFU':>8}{'peak GFLOP/s':>14}")
    for prec, name, dt, tps, mfu, peak in rows:
        print(f"{prec:<10}{name:<11}{dt:>8.3f}{tps:>10.0f}{100 * mfu:>7.1f}%{peak / 1e9:>14.1f}")
    by = {(r[0], r[1]): r[3] for r in rows}
    if ("fp32", "Trainer") in by and ("bf16", "Trainer") in by:
        print(f"\nbf16 autocast vs fp32 (Trainer): {by[('bf16', 'Trainer')] / by[('fp32', 'Trainer')]:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
