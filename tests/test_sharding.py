"""Device meshes: every engine on a ``(data, model)`` mesh of the eight simulated CPU devices
(conftest) gives the single-device numbers; parameters really are split; two processes run one
scan together.

Equality is checked in float64, where the only difference a mesh can make (the order of the sums
GSPMD splits over devices) is far below the 1e-9 tolerance, so any real error shows; and once in
float32, where that reordering moves results by float32 rounding (stated tolerance 1e-5 of the
largest effect).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrpatch import Model, Task, attribute, diagnose, make_mesh, patch, shard_model, validate
from attrpatch.arch.config import ModelConfig
from attrpatch.arch.transformer import init_params
from attrpatch.results import GRANULARITIES, available_granularities
from attrpatch.sharding import check_mesh, parse_mesh, replicated_params

NEURONS = [(0, 1), (1, 3), (1, 15)]
# 4 query heads and vocabulary 61: not divisible by a model axis of 8 (replicated there);
# 5 prompts: not divisible by any data axis above 1 (padded for AtP).
GPT2 = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=16, n_ctx=16, d_vocab=61)
# 8 query heads over 2 kv heads (kv replicated on model axes of 4 and 8); 8 prompts.
LLAMA_GQA = ModelConfig(n_layers=2, d_model=32, n_heads=8, d_mlp=16, n_ctx=16, d_vocab=64,
                        architecture="llama", n_kv_heads=2, norm="rmsnorm", positions="rotary",
                        gated_mlp=True, act_fn="silu", qkv_bias=False, attn_out_bias=False,
                        mlp_bias=False, tie_word_embeddings=False, rope_theta=100.0)
# 8 query heads over 2 kv heads with the 2025 families' switches: no input norms, post-norms, a
# q/k norm over the whole projection (a sum over the heads the model axis splits), a sliding-window
# layer with its own rotary base.
POST_NORM_QK = dataclasses.replace(LLAMA_GQA, architecture="olmo2", pre_norms=False, post_norms=True,
                                   qk_norm="projection", windows=(3, None), rope_local_theta=10.0)
SETUPS = {"gpt2": (GPT2, 5), "llama_gqa": (LLAMA_GQA, 8)}


def _model(cfg: ModelConfig, dtype=jnp.float64, seed=0) -> Model:
    """Random weights, three times GPT-2's init scale (attention far from uniform), random biases."""
    params = init_params(cfg, jax.random.PRNGKey(seed), jnp.float32)
    params = jax.tree.map(lambda x: 3 * x if x.ndim > 1 else x + 0.1 * np.cos(np.arange(x.size))
                          .reshape(x.shape).astype(np.float32), params)
    return Model(cfg, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))


def _task(cfg: ModelConfig, batch: int, n_pos=6, seed=0) -> Task:
    rng = np.random.default_rng(seed)
    clean = rng.integers(1, cfg.d_vocab, (batch, n_pos))
    corrupt = clean.copy()
    for b in range(batch):
        f = 1 + b % 3
        corrupt[b, f:] = rng.integers(1, cfg.d_vocab, n_pos - f)
    return Task(clean, corrupt, rng.integers(0, cfg.d_vocab, (batch, 2)),
                rng.integers(0, cfg.d_vocab, batch))


@pytest.fixture(scope="module")
def float64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def reference(float64):
    """`reference(name, what)`: single-device results, computed once."""
    done = {}

    def get(name, what):
        if (name, what) not in done:
            cfg, batch = SETUPS[name]
            model, task = _model(cfg), _task(cfg, batch)
            done[name, what] = _run(what, model, task, None)
        return done[name, what]

    return get


def _run(what: str, model, task, mesh):
    """One engine's results, by name."""
    grans = available_granularities(model.config, list(GRANULARITIES))
    if what == "atp":
        return [attribute(model, task, grans, direction=d, per_prompt=True, mesh=mesh)
                for d in ("denoise", "noise")]
    if what == "atp_star":
        return attribute(model, task, ("q", "k_by_pos", "z"), method="atp_star", mesh=mesh)
    if what == "diagnose":
        return diagnose(model, task, ("z", "k", "resid_pre"), "noise", mesh=mesh)
    if what == "exact_some":  # a representative set on every mesh
        return patch(model, task, ("resid_pre", "z", "k_by_pos", "pattern_by_entry", "mlp_out",
                                   "post_by_pos"), "denoise", neurons=NEURONS, per_prompt=True,
                     progress=False, mesh=mesh)
    direction = what.removeprefix("exact_all_")  # every granularity, one direction
    return patch(model, task, grans, direction, neurons=NEURONS, progress=False, mesh=mesh)


def _assert_same(got, want, tol):
    """Two PatchResults (or lists of them) equal to `tol`, NaN where the other is NaN."""
    if isinstance(want, list):
        for g_, w_ in zip(got, want, strict=True):
            _assert_same(g_, w_, tol)
        return
    assert got.scores.keys() == want.scores.keys()
    for g in want.scores:
        np.testing.assert_allclose(got[g], want[g], rtol=0, atol=tol, err_msg=g)
        if want.scores[g].per_prompt is not None:
            np.testing.assert_allclose(got.scores[g].per_prompt, want.scores[g].per_prompt,
                                       rtol=0, atol=tol, err_msg=g)
    np.testing.assert_allclose(got.base_metric_per_prompt, want.base_metric_per_prompt, atol=tol)
    np.testing.assert_allclose(got.source_metric_per_prompt, want.source_metric_per_prompt, atol=tol)
    for g, v in (want.graddrop or {}).items():
        np.testing.assert_allclose(got.graddrop[g], v, rtol=0, atol=tol, err_msg=f"graddrop {g}")


# By default each mesh shape once, each model on two (a new mesh compiles everything anew; the
# model axis does not divide GPT-2's 4 heads and 61 tokens at 8, nor the GQA model's 2 kv heads
# at 4), and exact patching of every granularity on one mesh (the test after this one).
# ATTRPATCH_FULL_MATRIX=1: every model on every mesh, exact patching of every granularity in
# both directions on each (about 20 minutes more).
FULL_MATRIX = os.environ.get("ATTRPATCH_FULL_MATRIX") == "1"
MESHES = [(8, 1), (2, 4), (1, 8), (4, 2)]
COMBOS = ([(name, shape) for name in SETUPS for shape in MESHES] if FULL_MATRIX else
          [("gpt2", (8, 1)), ("gpt2", (1, 8)), ("llama_gqa", (2, 4)), ("llama_gqa", (4, 2))])


@pytest.mark.parametrize("name, shape", COMBOS,
                         ids=lambda x: x if isinstance(x, str) else f"{x[0]}x{x[1]}")
def test_every_engine_equals_one_device(reference, name, shape):
    """AtP (every granularity, both directions, per prompt), AtP*, diagnose, exact patching (a
    representative set of granularities; all of them with the full matrix) and validation: the
    same numbers on the mesh."""
    cfg, batch = SETUPS[name]
    model, task, mesh = _model(cfg), _task(cfg, batch), make_mesh(*shape)
    exact_all = ("exact_all_denoise", "exact_all_noise") if FULL_MATRIX else ()
    for what in ("atp", "atp_star", "exact_some", *exact_all):
        _assert_same(_run(what, model, task, mesh), reference(name, what), 1e-9)
    got, want = _run("diagnose", model, task, mesh), reference(name, "diagnose")
    for field in ("big_patch", "attn_saturation", "estimate_base", "estimate_mid",
                  "estimate_source"):
        for g, v in getattr(want, field).items():
            np.testing.assert_allclose(getattr(got, field)[g], v, atol=1e-9, err_msg=f"{field} {g}")
    # validation of the mesh's AtP against the mesh's exact: the single-device verdicts
    ours = validate(_run("atp", model, task, mesh)[0], _run("exact_some", model, task, mesh))
    theirs = validate(reference(name, "atp")[0], reference(name, "exact_some"))
    _assert_close_json(ours.to_json(), theirs.to_json())


def _assert_close_json(a, b, where="validation"):
    """JSON-like `a` and `b` equal, floats to 1e-6 relative or 1e-9 absolute. Spearman is left
    out: it ranks the many components whose effects are 0 up to rounding (1e-17 here), so
    rounding alone reorders them."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), where
        for k in b:
            if k != "spearman":
                _assert_close_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close_json(x, y, f"{where}[{i}]")
    elif isinstance(b, float) and isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9, nan_ok=True), where
    else:
        assert a == b, where


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_every_granularity_on_a_2x4_mesh(reference, direction):
    """Exact patching of every granularity of the GQA model, both directions, on a mesh that
    splits both prompts' patched runs and heads."""
    cfg, batch = SETUPS["llama_gqa"]
    got = _run(f"exact_all_{direction}", _model(cfg), _task(cfg, batch), make_mesh(2, 4))
    _assert_same(got, reference("llama_gqa", f"exact_all_{direction}"), 1e-9)


def test_post_norms_and_whole_projection_qk_norm_on_a_2x4_mesh(float64):
    """The 2025 families' switches on a mesh that splits the heads the q/k norm sums over: AtP*
    (the QK fix recomputes every head's norm) and exact patching of queries and keys give the
    single-device numbers."""
    model, task = _model(POST_NORM_QK), _task(POST_NORM_QK, 8)

    def run(mesh):
        return [attribute(model, task, ("q", "k_by_pos", "z"), method="atp_star", mesh=mesh),
                patch(model, task, ("resid_pre", "q_by_pos", "k"), per_prompt=True, progress=False,
                      mesh=mesh)]

    _assert_same(run(make_mesh(2, 4)), run(None), 1e-9)


def test_float32_on_a_mesh_within_rounding():
    """float32 (the default): mesh results equal one device's to float32 rounding."""
    cfg, batch = SETUPS["llama_gqa"]
    model, task = _model(cfg, jnp.float32), _task(cfg, batch)
    grans = ("resid_pre", "z", "k", "post")
    for engine in (lambda m: attribute(model, task, grans, mesh=m),
                   lambda m: patch(model, task, grans[:3], progress=False, mesh=m)):
        want = engine(None)
        scale = max(np.nanmax(np.abs(want[g])) for g in want.scores)
        _assert_same(engine(make_mesh(2, 4)), want, 1e-5 * scale)


def test_atp_batch_size_equals_one_batch():
    """Prompt micro-batches (the last one short) give one batch's numbers, for every estimator,
    a batch-normalised metric, and on a mesh whose data axis pads each micro-batch."""
    cfg = LLAMA_GQA
    model, task = _model(cfg, jnp.float32), _task(cfg, 7)
    grans = ("resid_pre", "z", "k_by_pos", "q")
    for method in ("atp", "atp_star", "relp", "ig_inputs"):
        want = attribute(model, task, grans, metric="normalized_logit_diff", method=method,
                         per_prompt=True)
        for batch_size, mesh in ((2, None), (3, make_mesh(4, 1)), (100, None)):
            got = attribute(model, task, grans, metric="normalized_logit_diff", method=method,
                            per_prompt=True, batch_size=batch_size, mesh=mesh)
            scale = max(np.abs(want[g]).max() for g in grans)
            _assert_same(got, want, 1e-6 * max(scale, 1))
    with pytest.raises(ValueError, match="batch_size"):
        attribute(model, task, grans, batch_size=0)


def test_parameters_are_split_over_the_model_axis():
    """Each device holds 1/M of W_Q and W_in (and of the vocabulary); a dimension the axis does
    not divide is replicated and listed."""
    model = _model(LLAMA_GQA, jnp.float32)
    for m in (2, 4, 8):
        mesh = make_mesh(8 // m, m)
        params = shard_model(model, mesh).params
        for key, axis in (("W_Q", 2), ("W_in", 2), ("W_out", 1), ("W_O", 1)):
            x = params["blocks"][key]
            for shard in x.addressable_shards:
                assert shard.data.shape[axis] == x.shape[axis] // m, (key, m)
        assert params["W_U"].addressable_shards[0].data.shape[1] == 64 // m
        kv = params["blocks"]["W_K"]  # 2 kv heads: split over 2 devices, else replicated
        assert {s.data.shape[2] for s in kv.addressable_shards} == {1 if m == 2 else 2}
        assert ("blocks.W_K" in replicated_params(model.params, mesh)) == (m > 2)
    # GPT-2 here: 4 heads and 61 tokens on a model axis of 8 are replicated, not refused
    gpt = shard_model(_model(GPT2, jnp.float32), make_mesh(1, 8)).params
    assert gpt["blocks"]["W_Q"].sharding.is_fully_replicated
    assert gpt["blocks"]["W_in"].addressable_shards[0].data.shape[2] == 16 // 8


def test_compiled_memory_per_device_falls_with_the_model_axis():
    """Per-device memory of AtP's compiled computation (arguments, temporaries, outputs) on a
    wider model: more model-axis devices, less each."""
    from attrpatch.attribution import attribute_memory

    cfg = ModelConfig(n_layers=2, d_model=128, n_heads=8, d_mlp=512, n_ctx=32, d_vocab=512)
    model, task = _model(cfg, jnp.float32), _task(cfg, 8, n_pos=16)
    totals = [attribute_memory(model, task, ("z", "post"), mesh=make_mesh(1, m))["total"]
              for m in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(totals, totals[1:], strict=False)), totals
    assert totals[-1] < 0.5 * totals[0], totals


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="needs 16 devices; 8 are visible"):
        make_mesh(4, 4)
    with pytest.raises(ValueError, match="positive integer"):
        make_mesh(0, 1)
    bad = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("x", "y"))
    with pytest.raises(ValueError, match="mesh axes must be named"):
        check_mesh(bad)
    with pytest.raises(ValueError, match="data=D,model=M"):
        parse_mesh("data=2,heads=4")
    assert parse_mesh("model=4") == (1, 4) and parse_mesh("data=2,model=4") == (2, 4)
    # a mesh built with JAX's default (explicit) axis types is used with automatic ones
    explicit = jax.make_mesh((2, 4), ("data", "model"))
    assert all(t == jax.sharding.AxisType.Auto for t in check_mesh(explicit).axis_types)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_run_one_scan(tmp_path):
    """Two processes on localhost (gloo CPU collectives), one device each, run one scan over a
    2-process data mesh: the results equal a one-process run, and only process 0 wrote --out."""
    from conftest import build_hf_gpt2

    ckpt = tmp_path / "tiny"
    build_hf_gpt2(seed=3).save_pretrained(ckpt)
    rng = np.random.default_rng(0)
    clean = rng.integers(1, 61, (4, 6))
    corrupt = clean.copy()
    corrupt[:, 2:] = rng.integers(1, 61, (4, 4))
    data = tmp_path / "data.npz"
    np.savez(data, clean_tokens=clean, corrupt_tokens=corrupt,
             correct_tokens=rng.integers(1, 61, 4), incorrect_tokens=rng.integers(1, 61, 4))
    args = ["-m", "attrpatch", "scan", "--model", str(ckpt), "--data", str(data), "--sites",
            "z", "resid_pre", "--methods", "atp,exact", "--quiet", "--out", "out"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = []
    for i in range(2):
        (tmp_path / f"p{i}").mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, *args, "--mesh", "data=2", "--coordinator", f"localhost:{port}",
             "--num-processes", "2", "--process-id", str(i)],
            cwd=tmp_path / f"p{i}", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    (tmp_path / "single").mkdir()
    single = subprocess.run([sys.executable, *args], cwd=tmp_path / "single", env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    assert not (tmp_path / "p1" / "out").exists()  # only process 0 writes
    two, one = tmp_path / "p0" / "out", tmp_path / "single" / "out"
    assert json.loads((two / "summary.json").read_text())["mesh"] == {
        "data": 2, "model": 1, "devices": 2, "processes": 2}
    assert json.loads((one / "summary.json").read_text())["mesh"]["devices"] == 1
    with np.load(two / "results.npz") as a, np.load(one / "results.npz") as b:
        assert set(a.files) == set(b.files) == {"atp/z", "atp/resid_pre", "exact/z",
                                                "exact/resid_pre"}
        for k in a.files:
            np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


def test_save_model_writes_sharded_bfloat16(tmp_path):
    """`save_model(dtype=bfloat16, max_shard_bytes=...)`: several files and an index that
    `load_model` (and transformers) read; the weights are the bfloat16-rounded ones."""
    from attrpatch import load_model, save_model

    model = _model(LLAMA_GQA, jnp.float32)
    save_model(model, tmp_path / "ckpt", dtype=jnp.bfloat16, max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
    assert len(files) > 1 and files[-1].endswith(f"of-{len(files):05d}.safetensors")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    loaded = load_model(tmp_path / "ckpt")
    rounded = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16), np.float32), model.params)
    for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(rounded)[0],
                                 jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(path))


def test_out_of_memory_says_what_to_lower(monkeypatch):
    """A device out-of-memory error (XLA's RESOURCE_EXHAUSTED; CPUs never raise one) becomes a
    MemoryError naming the settings to lower."""
    import attrpatch.attribution as attribution

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8 GiB")

    monkeypatch.setattr(attribution, "_estimate", exhausted)
    model, task = _model(GPT2, jnp.float32), _task(GPT2, 4)
    with pytest.raises(MemoryError, match="ran out of memory: 2 prompts per micro-batch. Lower "
                                          "batch_size=, pass remat=True"):
        attribute(model, task, ("z",), batch_size=2)


def test_cli_refuses_a_mesh_it_cannot_build(tmp_path, capsys):
    """A bad --mesh is a clear error (exit 2) before anything runs, and nothing is written."""
    from attrpatch.cli import main

    for mesh, message in (("data=3,model=4", "needs 12 devices; 8 are visible"),
                          ("data=2,layers=4", "expected data=D,model=M")):
        rc = main(["scan", "--model", "nowhere", "--data", "none.npz", "--mesh", mesh,
                   "--out", str(tmp_path / "o")])
        assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
