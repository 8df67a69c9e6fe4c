"""Published config.json files load as the Hub has them, and compute what `transformers` computes
from the same file (legacy values reinterpreted as it does, with its warning)."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
from hub_configs import PUBLISHED, VOCAB, shrink

import attrpatch
from attrpatch.arch import CONVERTERS
from attrpatch.arch.hub_audit import REINTERPRETED, LegacyConfigWarning

pytestmark = pytest.mark.filterwarnings("ignore::attrpatch.arch.hub_audit.LegacyConfigWarning")


def _randomize(model, gemma: bool, seed: int = 0):
    """Non-trivial random weights: norms away from their identity, biases non-zero."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


def _checkpoint(raw: dict, path):
    """A random checkpoint in `path` whose config.json is `raw`, byte for byte as published
    (shrunk); the tensors come from `transformers` reading that same file."""
    import torch
    import transformers

    path.mkdir()
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    config = transformers.AutoConfig.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, raw["model_type"].startswith("gemma"))
    model.save_pretrained(path, safe_serialization=True)
    (path / "config.json").write_text(json.dumps(raw, indent=2))  # back to the published form


# Legacy spellings other tools write, on top of a published config: (repo, fields changed).
VARIANTS = {
    "mistral-with-layer-types": ("mistralai/Mistral-7B-v0.1",
                                 {"layer_types": ["full_attention", "sliding_attention"] * 3,
                                  "head_dim": 8}),  # transformers' Ministral needs head_dim
    "gpt2-generic-names": ("openai-community/gpt2", {"hidden_size": 32, "num_attention_heads": 4}),
    "qwen2-rope-scaling-and-parameters": ("Qwen/Qwen2-0.5B", {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10.0},
        "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "llama3-without-original-max": ("meta-llama/Llama-3.2-1B", {
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "rope_type": "llama3"}}),
}


def _published_or_variant(name: str) -> dict:
    if name in PUBLISHED:
        return shrink(PUBLISHED[name])
    repo, changes = VARIANTS[name]
    raw = shrink(PUBLISHED[repo]) | changes
    if "hidden_size" in changes:  # the generic name replaces GPT-2's own
        del raw["n_embd"], raw["n_head"]
    return raw


@pytest.mark.parametrize("name", [*PUBLISHED, *VARIANTS])
def test_published_config_loads_and_matches_transformers(name, tmp_path, caplog):
    import torch
    import transformers

    raw = _published_or_variant(name)
    _checkpoint(raw, tmp_path / "ckpt")
    with caplog.at_level(logging.INFO, logger="transformers"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt",
                                                               attn_implementation="eager",
                                                               dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attrpatch.load_model(tmp_path / "ckpt")
    ours = [str(w.message) for w in caught if issubclass(w.category, LegacyConfigWarning)]
    expected = [r for r in REINTERPRETED if raw["model_type"] in r.families and r.field in raw]
    assert len(ours) == len(expected), ours
    for r, message in zip(expected, ours, strict=True):
        assert r.message.split(" (")[0] in message
        assert r.message.split(" (")[0].split(". ")[0] in caplog.text  # transformers said the same

    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(model(tokens))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", sorted(CONVERTERS))
def test_todays_default_config_of_every_family_is_fully_classified(model_type):
    """Every field today's `transformers` config class writes is read, bookkeeping, or refused
    only at a value that changes the computation: its default config loads."""
    import transformers

    raw = transformers.AutoConfig.for_model(model_type).to_dict()
    raw = shrink(raw | {"model_type": model_type})
    cfg = CONVERTERS[model_type].config_from_hf(raw)
    assert cfg.architecture == model_type


@pytest.mark.parametrize("field, value, match", [
    ("rope_interleaved", True, "rope_interleaved=True"),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, "quantization_config"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "'dynamic' is not supported"),
    ("use_qk_norm", True, "use_qk_norm=True"),
    ("some_new_switch", 3, "'some_new_switch'"),
])
def test_fields_that_change_the_computation_are_refused_by_name(field, value, match):
    raw = shrink(PUBLISHED["HuggingFaceTB/SmolLM2-135M-Instruct"]) | {field: value}
    with pytest.raises(ValueError, match=match):
        CONVERTERS["llama"].config_from_hf(raw)


def test_legacy_gemma_activation_is_reinterpreted_with_one_warning():
    raw = shrink(PUBLISHED["google/gemma-2b"])
    with pytest.warns(LegacyConfigWarning, match="gelu_pytorch_tanh") as caught:
        cfg = CONVERTERS["gemma"].config_from_hf(raw)
    assert cfg.act_fn == "gelu_pytorch_tanh" and len(caught) == 1


def test_absent_fields_take_the_transformers_default():
    """Gemma 2 without soft-cap fields soft-caps at transformers' defaults; an explicit null turns
    them off; GPT-NeoX without rotary_pct rotates a quarter of each head."""
    raw = shrink(PUBLISHED["google/gemma-2-2b"])
    absent = {k: v for k, v in raw.items() if not k.endswith("softcapping")}
    cfg = CONVERTERS["gemma2"].config_from_hf(absent)
    assert (cfg.attn_softcap, cfg.final_softcap) == (50.0, 30.0)
    off = CONVERTERS["gemma2"].config_from_hf(absent | {"attn_logit_softcapping": None,
                                                         "final_logit_softcapping": None})
    assert (off.attn_softcap, off.final_softcap) == (None, None)
    neox = shrink(PUBLISHED["EleutherAI/pythia-160m"])
    del neox["rotary_pct"]
    assert CONVERTERS["gpt_neox"].config_from_hf(neox).rotary_width == 8 // 4


def test_the_command_line_shows_a_reinterpretation_as_one_warning_line(tmp_path):
    import subprocess
    import sys

    _checkpoint(shrink(PUBLISHED["google/gemma-2b"]), tmp_path / "ckpt")
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"clean": "a b", "corrupt": "a c", "answer": " d", "wrong_answer": " e"}\n')
    proc = subprocess.run([sys.executable, "-m", "attrpatch", "scan", "--model", str(tmp_path / "ckpt"),
                           "--data", str(data), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    warned = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert warned == [line for line in warned if line.startswith("attrpatch: warning: config.json: "
                                                                 "hidden_act='gelu'")], proc.stderr
    assert len(warned) == 1 and "gelu_pytorch_tanh" in warned[0]
