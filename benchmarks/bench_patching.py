"""Exact patching engine vs a naive "one full jitted forward per patch" loop, per family, at the
GPT-2-small size.

Random models of each family at GPT-2 small's size (12 layers, d_model 768, 12 heads, vocab
50257): ``gpt2`` as GPT-2 small; ``llama`` with RMSNorm, rotary, 4 kv heads and a SwiGLU MLP of
width 2048 (three matrices with the parameters of GPT-2's two at 3072), untied. 8 IOI-shaped
prompts x 15 tokens with ABC corruption (names at positions 2, 4, 10 differ). Times the resid_pre,
z and z_by_pos grids (denoise, logit diff) and the naive loop (measured on a sample of patches,
extrapolated to the full grid; the naive forward also unembeds only the answer position, so the
ratio credits only the engine's other tricks). *Efficiency* is the FLOPs exact patching needs
(`needed_flops`: the two unpatched runs and the recomputation) per second, as a share of the
jitted 1024^3 matmul rate. The machine is
shared and its matmul rate moves by up to 2x within a minute, so each grid runs ``--rounds``
rounds of (matmul rate, engine, matmul rate, plain forward): *efficiency* takes the best of each
(the round's rate: the mean of the two around the engine), *paired* is the median of each
round's own ratio, and *vs forward* compares the engine with a plain jitted
forward doing the same kind of dense work (`PlainForward`, measured the same way), which is what
XLA reaches here without the engine's gathers. Prints a table; writes
``benchmarks/results/patching.json`` atomically.

Usage: ``python benchmarks/bench_patching.py [--families gpt2,llama] [--zbp-layers 0,6,11]
[--naive-samples 6] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from attrpatch import Interventions, Model, Patch, Task
from attrpatch.arch import ModelConfig
from attrpatch.arch.transformer import init_params
from attrpatch.atomic import atomic_write_json
from attrpatch.patching import patch
from attrpatch.task import METRICS, MetricReference


def ioi_task(batch=8, n_pos=15, vocab=50257, seed=0) -> Task:
    """IOI-shaped prompts: BOS When A and B went to the store , B gave a drink to -> A / B."""
    rng = np.random.default_rng(seed)
    template = rng.integers(100, vocab, n_pos)
    template[0] = 50256
    clean, corrupt, io, s = [], [], [], []
    for _ in range(batch):
        a, b, c, d, e = rng.choice(np.arange(1000, 2000), 5, replace=False)
        t = template.copy()
        t[[2, 4, 10]] = a, b, b
        u = t.copy()
        u[[2, 4, 10]] = c, d, e
        clean.append(t)
        corrupt.append(u)
        io.append(a)
        s.append(b)
    return Task(np.array(clean), np.array(corrupt), np.array(io), np.array(s))


FAMILIES = {
    "gpt2": ModelConfig(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, n_ctx=1024, d_vocab=50257),
    "llama": ModelConfig(n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_mlp=2048, n_ctx=1024,
                         d_vocab=50257, architecture="llama", norm="rmsnorm", positions="rotary",
                         gated_mlp=True, act_fn="silu", qkv_bias=False, attn_out_bias=False,
                         mlp_bias=False, tie_word_embeddings=False),
}


def kv_flops(cfg):
    """Multiply-add FLOPs of one position's keys and values."""
    return 2 * 2 * cfg.d_model * cfg.kv_heads * cfg.d_head


def after_attention_flops(cfg):
    """W_O and the MLP at one position."""
    matrices = 3 if cfg.gated_mlp else 2
    return 2 * (cfg.n_heads * cfg.d_head * cfg.d_model + matrices * cfg.d_model * cfg.d_mlp)


def flops_per_token_layer(cfg, n_keys):
    """Multiply-add FLOPs of one block for one query position attending over `n_keys` keys."""
    queries = 2 * cfg.d_model * cfg.n_heads * cfg.d_head
    mixing = 2 * 2 * n_keys * cfg.n_heads * cfg.d_head
    return queries + kv_flops(cfg) + mixing + after_attention_flops(cfg)


def forward_flops(cfg, batch, n_pos):
    """Multiply-add FLOPs of one forward of `batch` prompts of `n_pos` tokens, unembedding only
    the answer (last) position."""
    per_prompt = cfg.n_layers * sum(flops_per_token_layer(cfg, q + 1) for q in range(n_pos))
    return batch * (per_prompt + 2 * cfg.d_model * cfg.d_vocab)


def needed_flops(cfg, task, gran, layers):
    """FLOPs exact patching needs, which is what the engine computes but for rounding its packed
    row counts up: the two unpatched runs (clean and corrupted, whose caches the patches restart
    from; answer position unembedded); then per patched run (variant x prompt) and layer from the
    patched one, the positions start..answer (start: the patch position, or the prompt's first
    differing position for all-position head patches); head-output (z) patches leave their
    layer's attention as it was, so the patched layer runs only W_O and the MLP (at one row for
    by-position patches); the last block (unless patched) runs keys and values at every
    recomputed position and the rest at the answer only; then the two logit-difference columns
    at the answer. resid_pre patches in layer 0 where clean and corrupt tokens agree, and
    by-position head patches in the last layer away from the answer, are inert and not run."""
    L, H, d = cfg.n_layers, cfg.n_heads, cfg.d_model
    after_attention = after_attention_flops(cfg)
    differs = np.asarray(task.clean_tokens) != np.asarray(task.corrupt_tokens)
    total = 2.0 * forward_flops(cfg, task.batch, task.n_pos)
    for b, (fd, ans) in enumerate(zip(task.first_diff_positions, task.answer_positions, strict=True)):
        def rows(s, a=int(ans)):  # full blocks at positions s..ans
            return sum(flops_per_token_layer(cfg, q + 1) for q in range(s, a + 1))

        def tail(s, a=int(ans)):  # the last block: keys and values at s..ans, the rest at ans
            return (a + 1 - s) * kv_flops(cfg) + flops_per_token_layer(cfg, a + 1)

        for layer in layers:
            starts = [int(fd)] if gran == "z" else range(int(fd), int(ans) + 1)
            for s in starts:
                if gran == "resid_pre" and layer == 0 and not differs[b, s]:
                    continue
                if gran == "z_by_pos" and layer == L - 1 and s != ans:
                    continue
                variants = 1 if gran == "resid_pre" else H
                patched = {"resid_pre": rows(s), "z": (int(ans) + 1 - s) * after_attention,
                           "z_by_pos": after_attention}[gran]
                work = patched if layer == L - 1 else patched + (L - 2 - layer) * rows(s) + tail(s)
                total += variants * (work + 2 * d * 2)
    return total


def matmul_rate(n=1024, reps=5):
    """Measured jitted float32 matmul GFLOP/s on this machine."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def naive_time(model, task, gran, samples):
    """Seconds per patch of a naive full jitted forward (denoise), averaged over `samples`."""
    key = {"resid_pre": "hook_resid_pre", "z": "attn.hook_z", "z_by_pos": "attn.hook_z"}[gran]
    am, ans = task.attention_mask, task.answer_positions
    clean_logits, cache = model.run(task.clean_tokens, am, Interventions(), (key,), ans)
    corrupt_logits, _ = model.run(task.corrupt_tokens, am, Interventions(), (), ans)
    ref = MetricReference(clean_logits, corrupt_logits)
    src = cache[key]

    @jax.jit
    def one(mask):
        logits, _ = model.run(task.corrupt_tokens, am, Interventions(patch={key: Patch(mask, src)}),
                              (), ans)
        return METRICS["logit_diff"](logits, task, ref).mean()

    rng = np.random.default_rng(0)
    masks = []
    for _ in range(samples + 1):
        m = np.zeros(src.shape, bool)
        layer, pos, head = rng.integers(12), rng.integers(task.n_pos), rng.integers(12)
        if gran == "resid_pre":
            m[layer, :, pos] = True
        elif gran == "z":
            m[layer, :, :, head] = True
        else:
            m[layer, :, pos, head] = True
        masks.append(jnp.asarray(m))
    t = time.perf_counter()
    one(masks[0]).block_until_ready()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for m in masks[1:]:
        one(m).block_until_ready()
    return (time.perf_counter() - t) / samples, compile_s


class PlainForward:
    """A plain jitted forward of `rows` // 15 random 15-token prompts, unembedding the last
    position: the same dense work as the engine's packed rows, with none of its gathers, to
    compare the engine with what XLA does on this machine without them."""

    def __init__(self, model, rows, n_pos=15):
        cfg, batch = model.config, rows // n_pos
        self.tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.d_vocab, (batch, n_pos)))
        self.answers = jnp.full((batch,), n_pos - 1)
        self.flops = forward_flops(cfg, batch, n_pos)
        self.run = jax.jit(lambda t, a: model.run(t, None, Interventions(), (), a)[0])
        self.run(self.tokens, self.answers).block_until_ready()

    def seconds(self) -> float:
        t = time.perf_counter()
        self.run(self.tokens, self.answers).block_until_ready()
        return time.perf_counter() - t


def run_family(name, args, task, zbp_layers):
    """Rows of the table for one family (engine and naive loop on the same model and prompts)."""
    cfg = FAMILIES[name]
    model = Model(cfg, init_params(cfg, jax.random.PRNGKey(0)))
    fwd_flops = forward_flops(cfg, task.batch, task.n_pos)
    grids = {
        "resid_pre": (12 * task.n_pos, list(range(12))),
        "z": (12 * 12, list(range(12))),
        "z_by_pos": (12 * task.n_pos * 12, zbp_layers),
    }
    forward = PlainForward(model, rows=960)
    rows = []
    for gran, (n_patches, layers) in grids.items():
        run = functools.partial(patch, model, task, (gran,), batch_size=args.batch_size,
                                progress=False)
        # The first call compiles every shape (the layer index is traced, not static); then
        # `args.rounds` rounds each time the matmul rate, the engine, the rate again, a plain forward.
        t = time.perf_counter()
        res = run(layers=layers)
        cold = time.perf_counter() - t
        assert np.isfinite(res[gran][layers]).all()
        rounds = []
        for _ in range(args.rounds):
            before = matmul_rate()
            t = time.perf_counter()
            run(layers=layers)
            seconds = time.perf_counter() - t
            rounds.append(((before + matmul_rate()) / 2, seconds, forward.seconds()))
        rates, times, fwd_times = (np.array(x) for x in zip(*rounds, strict=True))
        ours = float(times.min())
        flops = needed_flops(cfg, task, gran, layers)
        full_flops = needed_flops(cfg, task, gran, range(12))
        ours_full = ours * full_flops / flops
        per_fwd, naive_compile = naive_time(model, task, gran, args.naive_samples)
        naive_full = per_fwd * n_patches
        rows.append(dict(
            family=name, granularity=gran, patches=n_patches, layers_run=layers,
            ours_s=ours, ours_full_grid_s=ours_full, ours_compile_s=cold - ours,
            naive_s_per_patch=per_fwd, naive_full_grid_s=naive_full, naive_compile_s=naive_compile,
            speedup=naive_full / ours_full, engine_gflop=flops / 1e9,
            engine_gflops_per_s=flops / ours / 1e9, naive_gflops_per_s=fwd_flops / per_fwd / 1e9,
            flop_ratio_naive_over_engine=n_patches * fwd_flops / full_flops,
            naive_forward_gflop=fwd_flops / 1e9,
            matmul_gflops_per_s=rates.tolist(), engine_s=times.tolist(), forward_s=fwd_times.tolist(),
            efficiency=flops / ours / (rates.max() * 1e9),
            efficiency_paired_median=float(np.median(flops / times / (rates * 1e9))),
            forward_efficiency=forward.flops / fwd_times.min() / (rates.max() * 1e9),
        ))
        rows[-1]["engine_over_forward"] = rows[-1]["efficiency"] / rows[-1]["forward_efficiency"]
        print(f"{name} {gran}: done", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="gpt2,llama", help=f"comma-separated: {', '.join(FAMILIES)}")
    ap.add_argument("--zbp-layers", default="0,6,11",
                    help="layers of the z_by_pos grid to run (extrapolated by FLOPs), or 'all'")
    ap.add_argument("--naive-samples", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed rounds per grid (matmul rate, engine, rate, plain forward)")
    args = ap.parse_args()

    task = ioi_task()
    zbp_layers = list(range(12)) if args.zbp_layers == "all" else [
        int(x) for x in args.zbp_layers.split(",")]
    rows = [r for name in args.families.split(",") for r in run_family(name, args, task, zbp_layers)]
    rates = [x for r in rows for x in r["matmul_gflops_per_s"]]
    print(f"\njitted matmul rate: {min(rates):.0f} to {max(rates):.0f} GFLOP/s over the run\n")
    head = ("family", "grid", "patches", "ours s", "compile s", "naive s", "speedup", "FLOP ratio",
            "ours GFLOP/s", "efficiency", "paired", "forward", "vs forward")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        ext = "" if len(r["layers_run"]) == 12 else "*"
        print(f"| {r['family']} | {r['granularity']} | {r['patches']} | {r['ours_full_grid_s']:.2f}{ext} | "
              f"{r['ours_compile_s']:.1f} | {r['naive_full_grid_s']:.1f} | {r['speedup']:.1f}x | "
              f"{r['flop_ratio_naive_over_engine']:.1f}x | {r['engine_gflops_per_s']:.1f} | "
              f"{100 * r['efficiency']:.0f}% | {100 * r['efficiency_paired_median']:.0f}% | "
              f"{100 * r['forward_efficiency']:.0f}% | {r['engine_over_forward']:.2f} |")
    print(f"* extrapolated from layers {zbp_layers} by FLOPs. Compile = first call minus second; "
          f"naive extrapolated from {args.naive_samples} patches per grid. Efficiency = needed "
          f"GFLOP/s at the engine's best of {args.rounds} rounds over the best matmul rate; paired: "
          "the median over rounds of each round's own ratio; forward: a plain jitted forward of "
          "960 rows, measured the same way; vs forward: efficiency / forward.")
    out = dict(device=str(jax.devices()[0]), batch=task.batch, n_pos=task.n_pos,
               batch_size=args.batch_size, rounds=args.rounds, rows=rows)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "patching.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_json(path, out)
    print("wrote", path)


if __name__ == "__main__":
    main()
