"""Shared fixtures: random Hugging Face GPT-2 checkpoints written with `save_pretrained`.

Biases and LayerNorm parameters are set to random non-trivial values (the library defaults of
zeros and ones hide bugs).
"""

from __future__ import annotations

import gc
import os

# Eight simulated CPU devices for the mesh tests (tests/test_sharding.py); everything else runs
# on the first, as it would without them. Must be set before JAX starts.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

# The command line keeps compiled code on disk across runs; the tests that call it in this
# process must not switch that on for the whole suite (test_cli tests the cache in subprocesses).
os.environ["ATTRPATCH_COMPILE_CACHE"] = "0"

import jax  # noqa: E402
import pytest

jax.config.update("jax_enable_x64", False)

# XLA's CPU backend maps each compiled executable's code into many memory regions (about 100 per
# exact-patching executable, measured), and Linux caps a process at vm.max_map_count (65,530 by
# default): past it, the next compile segfaults. The suite compiles thousands of executables in
# one process, so it drops JAX's compilation caches whenever the mappings pass this bound.
_MAX_MAPS = 30_000


def _memory_maps() -> int:
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _bounded_compiled_code():
    yield
    if _memory_maps() > _MAX_MAPS:
        jax.clear_caches()
        gc.collect()

TINY = dict(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)


def build_hf_gpt2(seed: int = 0, **overrides):
    """A random-initialised `transformers.GPT2LMHeadModel` in eval mode (float32)."""
    import torch
    import transformers

    kwargs = dict(TINY, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) | overrides
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: `hf_checkpoint(seed=0, **gpt2_config_overrides) -> (path, torch_model)`."""

    def make(seed: int = 0, save_kwargs: dict | None = None, **overrides):
        model = build_hf_gpt2(seed, **overrides)
        path = tmp_path / f"gpt2-{seed}-{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(path, **(save_kwargs or {}))
        return path, model

    return make


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random GPT-2 `attrpatch.Model` (2 layers, d_model 32, 4 heads, vocab 61, ctx 16)
    loaded through `load_model` from a `save_pretrained` checkpoint, and its torch twin."""
    import tempfile

    from attrpatch import load_model

    torch_model = build_hf_gpt2(seed=1)
    path = tempfile.mkdtemp(prefix="attrpatch-tiny-")
    torch_model.save_pretrained(path)
    return load_model(path), torch_model


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """`family(name) -> (attrpatch model, torch model, checkpoint dir)` for a family of
    tests/families.py, built once per name."""
    from families import build_hf

    from attrpatch import load_model

    built = {}

    def get(name):
        if name not in built:
            torch_model = build_hf(name)
            path = tmp_path_factory.mktemp(name)
            torch_model.save_pretrained(path)
            built[name] = (load_model(path), torch_model, path)
        return built[name]

    return get
