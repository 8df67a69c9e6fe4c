"""Scale: a Pythia-1.4B-shaped model on this machine, how cost grows with prompt length, and what
a device mesh does to per-device memory.

Stages (each in its own process, so its peak resident memory is its own):

- ``write``: a GPT-NeoX checkpoint of Pythia-1.4B's shape (24 layers, d_model 2048, 16 heads,
  d_mlp 8192, vocabulary 50304, partial rotary 0.25, parallel blocks), random weights, written by
  `attrpatch.save_model` as sharded bfloat16 safetensors (1 GiB files).
- ``atp_1.4b``: load it (float32 compute), AtP over every head and neuron (``z``, ``post``) for
  8 prompts x 64 tokens (the corrupted prompts differ from position 48 on), then exact patching
  of AtP's top 32 heads. Time and peak resident memory (``ru_maxrss``) of the stage.
- ``n_pos``: a GPT-2-small shape (12 layers, d_model 768, vocabulary 50257), 2 prompts differing
  from the middle on, at n_pos 16, 64, 256: AtP (``resid_pre``, ``z``), exact ``resid_pre`` by
  position and exact ``z``, in seconds (compiled, second call) and in forwards (seconds over one
  jitted forward of the same prompts).
- ``mesh``: 8 simulated CPU devices. AtP on the GPT-2-small shape (64 tokens) for each mesh
  shape, its largest difference from one device, and the per-device compiled memory
  (`attrpatch.attribution.attribute_memory`) of AtP on the GPT-2-small shape and on the
  1.4B shape (compiled from abstract parameters, never materialised). Wall time on simulated
  devices means nothing; memory does.

Writes ``benchmarks/results/scale.json``. Run: ``python benchmarks/bench_scale.py`` (about 15 min
on 2 CPU cores; ``--stages n_pos mesh`` for a subset).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
PYTHIA_1_4B = dict(model_type="gpt_neox", num_hidden_layers=24, hidden_size=2048,
                   num_attention_heads=16, intermediate_size=8192, max_position_embeddings=2048,
                   vocab_size=50304, hidden_act="gelu", use_parallel_residual=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                    "partial_rotary_factor": 0.25}, tie_word_embeddings=False)
GPT2_SMALL = dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, n_ctx=1024, d_vocab=50257)
MESHES = [(1, 1), (8, 1), (4, 2), (2, 4), (1, 8)]


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _task(vocab: int, batch: int, n_pos: int, first_diff: int, seed: int = 0):
    import numpy as np

    from attrpatch import Task

    rng = np.random.default_rng(seed)
    clean = rng.integers(1, vocab, (batch, n_pos))
    corrupt = clean.copy()
    corrupt[:, first_diff:] = rng.integers(1, vocab, (batch, n_pos - first_diff))
    return Task(clean, corrupt, rng.integers(0, vocab, batch), rng.integers(0, vocab, batch))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def stage_write(ckpt: Path) -> dict:
    import jax
    import jax.numpy as jnp

    from attrpatch import Model, save_model
    from attrpatch.arch import CONVERTERS
    from attrpatch.arch.transformer import init_params

    cfg = CONVERTERS["gpt_neox"].config_from_hf(PYTHIA_1_4B)
    params, seconds = _timed(lambda: jax.block_until_ready(
        init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    _, write_s = _timed(lambda: save_model(Model(cfg, params), ckpt, dtype=jnp.bfloat16,
                                           max_shard_bytes=2**30))
    files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    return {"n_params": int(n_params), "init_s": seconds, "write_s": write_s, "files": files,
            "bytes_on_disk": sum((ckpt / f).stat().st_size for f in files),
            "peak_rss_gib": _peak_gib()}


def stage_atp_1_4b(ckpt: Path) -> dict:
    import numpy as np

    from attrpatch import attribute, load_model, patch

    model, load_s = _timed(lambda: load_model(ckpt))
    task = _task(model.config.d_vocab, 8, 64, 48)
    atp, first_s = _timed(lambda: attribute(model, task, ("z", "post")))
    rss_atp = _peak_gib()
    _, warm_s = _timed(lambda: attribute(model, task, ("z", "post")))
    top = np.argsort(-np.abs(atp["z"]).ravel())[:32]
    heads = [tuple(int(i) for i in np.unravel_index(t, atp["z"].shape)) for t in top]
    exact, exact_s = _timed(lambda: patch(model, task, ("z",), components={"z": heads},
                                          progress=False))
    est = np.array([atp["z"][h] for h in heads])
    eff = np.array([exact["z"][h] for h in heads])
    return {"load_s": load_s, "atp_first_s": first_s, "atp_warm_s": warm_s,
            "exact_top32_heads_s": exact_s, "peak_rss_gib_after_atp": rss_atp,
            "peak_rss_gib": _peak_gib(), "n_components": int(atp["z"].size + atp["post"].size),
            "top32_pearson": float(np.corrcoef(est, eff)[0, 1]), "gap": float(atp.gap)}


def stage_n_pos() -> dict:
    import jax

    from attrpatch import Model, ModelConfig, attribute, patch
    from attrpatch.arch.transformer import init_params

    cfg = ModelConfig(**GPT2_SMALL)
    model = Model(cfg, init_params(cfg, jax.random.PRNGKey(0)))
    rows = []
    for n_pos in (16, 64, 256):
        task = _task(cfg.d_vocab, 2, n_pos, n_pos // 2)

        def forward(task=task):
            return jax.block_until_ready(model.run(task.corrupt_tokens,
                                                   logit_positions=task.answer_positions)[0])

        forward()
        _, forward_s = _timed(forward)
        row = {"n_pos": n_pos, "forward_s": forward_s}
        runs = {"atp": lambda t=task: attribute(model, t, ("resid_pre", "z")),
                "exact_resid_pre_by_pos": lambda t=task: patch(model, t, ("resid_pre",),
                                                               progress=False),
                "exact_z": lambda t=task: patch(model, t, ("z",), progress=False)}
        for name, run in runs.items():
            run()  # compiles
            _, seconds = _timed(run)
            row[f"{name}_s"], row[f"{name}_forwards"] = seconds, seconds / forward_s
        rows.append(row)
        print(row, flush=True)
    return {"shape": GPT2_SMALL, "prompts": 2, "first_diff": "n_pos // 2", "rows": rows}


def stage_mesh() -> dict:
    import jax
    import numpy as np

    from attrpatch import Model, ModelConfig, attribute, make_mesh
    from attrpatch.arch import CONVERTERS
    from attrpatch.arch.transformer import init_params
    from attrpatch.attribution import attribute_memory

    small = ModelConfig(**GPT2_SMALL)
    model = Model(small, init_params(small, jax.random.PRNGKey(0)))
    task = _task(small.d_vocab, 8, 64, 32)
    big = CONVERTERS["gpt_neox"].config_from_hf(PYTHIA_1_4B)
    abstract = Model(big, jax.eval_shape(lambda: init_params(big, jax.random.PRNGKey(0))))
    big_task = _task(big.d_vocab, 8, 64, 48)
    single = attribute(model, task, ("resid_pre", "z", "post"))
    rows = []
    for data, model_axis in MESHES:
        mesh = None if data * model_axis == 1 else make_mesh(data, model_axis)
        res = attribute(model, task, ("resid_pre", "z", "post"), mesh=mesh)
        diff = max(float(np.abs(res[g] - single[g]).max()) for g in res.scores)
        scale = max(float(np.abs(single[g]).max()) for g in single.scores)
        row = {"data": data, "model": model_axis, "max_abs_diff": diff, "max_abs_score": scale,
               "gpt2_small_bytes": attribute_memory(model, task, ("z", "post"), mesh=mesh),
               "pythia_1_4b_bytes": attribute_memory(abstract, big_task, ("z", "post"),
                                                     mesh=mesh)}
        rows.append(row)
        print({k: v for k, v in row.items() if "bytes" not in k},
              row["pythia_1_4b_bytes"]["total"] / 2**30, flush=True)
    return {"devices": len(jax.devices()), "rows": rows}


def _run_stage(name: str, ckpt: Path) -> dict:
    """`name` in a fresh process (its own peak memory; 8 simulated devices for ``mesh``)."""
    env = dict(os.environ)
    if name == "mesh":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    out = Path(tempfile.mkdtemp()) / "stage.json"
    subprocess.run([sys.executable, __file__, "--stage", name, "--ckpt", str(ckpt),
                    "--stage-out", str(out)], check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", default=["write", "atp_1.4b", "n_pos", "mesh"])
    parser.add_argument("--ckpt", default=None, help="where to write the 1.4B checkpoint")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:  # inside a stage's own process
        fns = {"write": lambda: stage_write(Path(args.ckpt)),
               "atp_1.4b": lambda: stage_atp_1_4b(Path(args.ckpt)),
               "n_pos": stage_n_pos, "mesh": stage_mesh}
        Path(args.stage_out).write_text(json.dumps(fns[args.stage]()))
        return

    import platform

    ckpt = Path(args.ckpt or tempfile.mkdtemp(prefix="pythia-1.4b-shape-")) / "ckpt"
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    for name in args.stages:
        results[name] = _run_stage(name, ckpt)
        print(name, json.dumps(results[name])[:400], flush=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(RESULTS)

    print("\n| stage | measure | value |\n| --- | --- | --- |")
    if "write" in results:
        w = results["write"]
        print(f"| write | parameters, files, bytes | {w['n_params'] / 1e9:.2f}B, {len(w['files'])}, "
              f"{w['bytes_on_disk'] / 2**30:.2f} GiB |")
    if "atp_1.4b" in results:
        a = results["atp_1.4b"]
        print(f"| 1.4B AtP z+post, 8x64 | first / warm s, peak RSS | {a['atp_first_s']:.1f} / "
              f"{a['atp_warm_s']:.1f}, {a['peak_rss_gib_after_atp']:.1f} GiB |")
        print(f"| 1.4B exact top-32 heads | s, Pearson with AtP | {a['exact_top32_heads_s']:.1f}, "
              f"{a['top32_pearson']:.3f} |")
    for r in results.get("n_pos", {}).get("rows", []):
        print(f"| GPT-2-small n_pos {r['n_pos']} | AtP / exact resid_pre / exact z (forwards) | "
              f"{r['atp_forwards']:.1f} / {r['exact_resid_pre_by_pos_forwards']:.1f} / "
              f"{r['exact_z_forwards']:.1f} |")
    for r in results.get("mesh", {}).get("rows", []):
        print(f"| mesh {r['data']}x{r['model']} | max diff vs 1 device; MiB per device GPT-2-small, "
              f"GiB 1.4B | {r['max_abs_diff']:.1e}; {r['gpt2_small_bytes']['total'] / 2**20:.0f}, "
              f"{r['pythia_1_4b_bytes']['total'] / 2**30:.2f} |")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
