"""Edges and circuits: what EAP and EAP-IG cost, how fast exact edge patching is, and how
faithful each method's circuits are.

1. *Cost on a GPT-2-small shape* (12 layers, 12 heads, d_model 768, vocab 50257, random weights;
   ``--batch`` prompts of ``--pos`` tokens): seconds per call (warm, after a compiling call) of
   one plain forward, EAP and EAP-IG (inputs, ``--steps``), for every edge of the graph; the
   ratio to the forward (measured cost in forwards) beside the nominal one
   (`edge_method_cost`); XLA's compiled temporary memory for EAP.
2. *Exact single-edge patching* on ``models/ioi-gpt2-4l`` (its task, ``--prompts`` prompts):
   edges per second of `patch_edges_each` (batched, 32 edges per compiled call) against a
   naive loop (one `patch_edges` forward per edge, compiled once), both warm.
3. *Faithfulness* at 5/10/20/50% of the edges, for each method (and exact single-edge scores),
   on the three shipped models (their own tasks; the induction model corrupts the token before
   the answer's first occurrence, where the previous-token -> induction-key path carries it).

Usage: ``python benchmarks/bench_circuits.py [--batch 8] [--pos 16] [--prompts 16]``; prints the
tables and writes ``benchmarks/results/circuits.json`` (atomically). Ratios within one run are
the claim; absolute seconds are this machine's.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from attrpatch import Model, Task, load_model, task_for_model
from attrpatch.arch import ModelConfig
from attrpatch.arch.transformer import init_params
from attrpatch.atomic import atomic_write_json
from attrpatch.attribution import _reference_logits
from attrpatch.circuits import (
    EdgeGraph,
    attribute_edges,
    edge_method_cost,
    faithfulness_curve,
    patch_edges_each,
)
from attrpatch.circuits.edges import (
    _cache,
    _destination_sites,
    _gradient_scores,
    _Runs,
    _source_sites,
)
from attrpatch.task import METRICS

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {"ioi-gpt2-4l": {}, "ioi-llama-4l": {}, "attn-only-2l-induction": {"corrupt": "previous"}}


def _warm(fn) -> float:
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gpt2_small_cost(batch: int, n_pos: int, steps: int) -> dict:
    cfg = ModelConfig(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, n_ctx=1024, d_vocab=50257)
    model = Model(cfg, init_params(cfg, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    clean = rng.integers(0, cfg.d_vocab, (batch, n_pos))
    corrupt = clean.copy()
    corrupt[:, n_pos // 2] = rng.integers(0, cfg.d_vocab, batch)
    task = Task(clean, corrupt, rng.integers(0, cfg.d_vocab, batch), rng.integers(0, cfg.d_vocab, batch))
    forward = jax.jit(lambda m, t: m.run(t, logit_positions=jnp.full(batch, n_pos - 1))[0])
    forward_s = _warm(lambda: forward(model, task.corrupt_tokens).block_until_ready())
    eap_s = _warm(lambda: attribute_edges(model, task, "eap"))
    ig_s = _warm(lambda: attribute_edges(model, task, "eap_ig_inputs", steps=steps))
    keys = tuple(sorted({*_destination_sites(cfg), *_source_sites(cfg), "ln_final.hook_normalized"}))
    base, source = task.runs("denoise")
    compiled = _gradient_scores.lower(
        model, task, _reference_logits(model, task), base, _cache(model, task, base, keys),
        _cache(model, task, source, keys), jnp.zeros(cfg.n_layers, bool), jnp.zeros(1),
        metric_fn=METRICS["logit_diff"], moved=None, by_pos=False, per_prompt=False).compile()
    memory = compiled.memory_analysis()
    graph = EdgeGraph(cfg)
    return {"n_edges": graph.n_edges, "n_sources": len(graph.sources),
            "n_destinations": len(graph.destinations), "batch": batch, "n_pos": n_pos,
            "steps": steps, "forward_s": forward_s, "eap_s": eap_s, "eap_ig_inputs_s": ig_s,
            "eap_forwards_measured": eap_s / forward_s,
            "eap_ig_inputs_forwards_measured": ig_s / forward_s,
            "eap_forwards_nominal": edge_method_cost("eap", 12),
            "eap_ig_inputs_forwards_nominal": edge_method_cost("eap_ig_inputs", 12, steps),
            "eap_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
            "eap_argument_bytes": getattr(memory, "argument_size_in_bytes", None)}


def exact_speed(n_prompts: int, n_naive: int) -> dict:
    model_dir = ROOT / "models" / "ioi-gpt2-4l"
    model, task = load_model(model_dir), task_for_model(model_dir, n_prompts=n_prompts)
    graph = EdgeGraph(model.config)
    edges = graph.edge_list()
    batched_s = _warm(lambda: patch_edges_each(model, task, edges, chunk_size=32))
    runs = _Runs.of(model, task, "denoise", None)
    masks = [graph.mask_of([e]) for e in edges[:n_naive]]
    runs.metric_with(masks[0])  # compile

    def naive():
        return [runs.metric_with(m).mean() for m in masks]

    naive_s = _warm(naive)
    batched = patch_edges_each(model, task, edges[:n_naive], chunk_size=32)
    agree = max(abs(batched.score(*e) - (v - runs.base_metric.mean()))
                for e, v in zip(edges[:n_naive], naive(), strict=True))
    return {"n_edges": len(edges), "n_prompts": task.batch, "batched_s": batched_s,
            "batched_edges_per_s": len(edges) / batched_s, "naive_edges": n_naive,
            "naive_s": naive_s, "naive_edges_per_s": n_naive / naive_s,
            "speedup": (len(edges) / batched_s) / (n_naive / naive_s),
            "max_abs_difference": float(agree)}


def faithfulness(n_prompts: int, steps: int) -> dict:
    out = {}
    for name, overrides in SHIPPED.items():
        model_dir = ROOT / "models" / name
        model = load_model(model_dir)
        task = task_for_model(model_dir, n_prompts=n_prompts, **overrides)
        n = EdgeGraph(model.config).n_edges
        sizes = sorted({max(1, round(n * f)) for f in (0.05, 0.1, 0.2, 0.5)})
        scores = {m: attribute_edges(model, task, m, steps=steps)
                  for m in ("eap", "eap_ig_inputs", "eap_ig_activations")}
        scores["exact"] = patch_edges_each(model, task, chunk_size=32)
        points = faithfulness_curve(model, task, scores, sizes)
        out[name] = {"n_edges": n, "sizes": sizes,
                     "faithfulness": {m: [float(p.faithfulness) for p in points if p.method == m]
                                      for m in scores}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pos", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--naive", type=int, default=64, help="edges in the naive loop")
    args = ap.parse_args()
    cost = gpt2_small_cost(args.batch, args.pos, args.steps)
    print(f"\nGPT-2-small shape, {cost['n_edges']} edges ({cost['n_sources']} sources x "
          f"{cost['n_destinations']} destinations), batch {args.batch} x {args.pos} tokens")
    print("| method | seconds (warm) | cost in forwards, measured | nominal |")
    print("| --- | --- | --- | --- |")
    print(f"| forward | {cost['forward_s']:.3f} | 1 | 1 |")
    for m in ("eap", "eap_ig_inputs"):
        print(f"| {m} | {cost[m + '_s']:.2f} | {cost[m + '_forwards_measured']:.1f} | "
              f"{cost[m + '_forwards_nominal']:.0f} |")
    print(f"EAP compiled temporaries: {cost['eap_temp_bytes'] / 2**30:.2f} GiB")
    speed = exact_speed(args.prompts, args.naive)
    print(f"\nExact single-edge patching, ioi-gpt2-4l ({speed['n_edges']} edges, "
          f"{speed['n_prompts']} prompts)")
    print("| engine | edges/s |\n| --- | --- |")
    print(f"| patch_edges_each (32 per call) | {speed['batched_edges_per_s']:.1f} |")
    print(f"| naive loop (one forward per edge) | {speed['naive_edges_per_s']:.1f} |")
    print(f"speed-up {speed['speedup']:.1f}x; max |difference| {speed['max_abs_difference']:.2e}")
    faith = faithfulness(args.prompts, args.steps)
    print("\nFaithfulness (top-|score| circuits, exact edge patching, denoise)")
    for name, r in faith.items():
        print(f"\n{name} ({r['n_edges']} edges)\n| method | "
              + " | ".join(f"{n} edges" for n in r["sizes"]) + " |")
        print("| --- |" + " --- |" * len(r["sizes"]))
        for m, values in r["faithfulness"].items():
            print(f"| {m} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    atomic_write_json(ROOT / "benchmarks" / "results" / "circuits.json", {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "jax": jax.__version__, "devices": str(jax.devices())},
        "args": vars(args), "gpt2_small_cost": cost, "exact_speed": speed, "faithfulness": faith})


if __name__ == "__main__":
    main()
