"""Time a full attribution-patching scan against one forward pass of the same batch.

A GPT-2-small-shaped random model (12 layers, d_model 768, 12 heads, vocab 50257, ctx 1024 by
default). AtP needs a source forward plus a base forward and backward, so about 4 forwards is
the physical limit of the ratio (backward ~ 2 forwards).

Usage: ``python benchmarks/bench_attribution.py [--batch 8] [--pos 16] [--repeats 5]``; prints a
table and writes ``benchmarks/results/attribution.json`` (atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from attrpatch.arch import ModelConfig
from attrpatch.arch.transformer import init_params
from attrpatch.atomic import atomic_write_json
from attrpatch.attribution import attribute
from attrpatch.model import Model
from attrpatch.task import Task

GRANULARITIES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "z_by_pos",
                 "q", "k", "v", "pattern", "post")
OUT = Path(__file__).parent / "results" / "attribution.json"


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pos", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    cfg = ModelConfig(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                     d_mlp=4 * args.d_model, n_ctx=1024, d_vocab=args.vocab)
    model = Model(cfg, init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    clean = rng.integers(0, cfg.d_vocab, (args.batch, args.pos))
    corrupt = clean.copy()
    corrupt[:, args.pos // 2] = rng.integers(0, cfg.d_vocab, args.batch)
    task = Task(clean, corrupt, rng.integers(0, cfg.d_vocab, args.batch),
                rng.integers(0, cfg.d_vocab, args.batch))
    pos = task.answer_positions

    def forward():  # what each of AtP's runs is: logits at the answer positions only
        jax.block_until_ready(model.run(task.clean_tokens, logit_positions=pos)[0])

    def forward_full():
        jax.block_until_ready(model.run(task.clean_tokens)[0])

    def atp():
        attribute(model, task, GRANULARITIES, remat=args.remat)  # returns host numpy arrays

    t_fwd = timed(forward, args.repeats)
    t_full = timed(forward_full, args.repeats)
    t_atp = timed(atp, args.repeats)
    med = {k: statistics.median(v) for k, v in
           (("forward", t_fwd), ("forward_all_logits", t_full), ("atp", t_atp))}
    result = {
        "benchmark": "attribution",
        "config": {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
                   "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx},
        "batch": args.batch, "n_pos": args.pos, "repeats": args.repeats, "remat": args.remat,
        "granularities": list(GRANULARITIES),
        "seconds": {"forward": t_fwd, "forward_all_logits": t_full, "atp": t_atp},
        "median_seconds": med,
        "atp_over_forward": med["atp"] / med["forward"],
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "jax": jax.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    print(f"GPT-2-shaped ({cfg.n_layers}L d{cfg.d_model} h{cfg.n_heads} V{cfg.d_vocab}), "
          f"batch {args.batch} x {args.pos} tokens, {jax.default_backend()}, "
          f"median of {args.repeats}")
    print(f"{'run':<34}{'median s':>10}{'x forward':>11}")
    rows = (("forward (answer-position logits)", med["forward"]),
            ("forward (all logits)", med["forward_all_logits"]),
            (f"AtP, {len(GRANULARITIES)} granularities", med["atp"]))
    for name, t in rows:
        print(f"{name:<34}{t:>10.4f}{t / med['forward']:>11.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
