"""attrpatch: attribution patching and exact activation patching in JAX, validated against each other.

The public API below is imported on first use (PEP 562), so ``import attrpatch`` and the
command line start without loading JAX until they need it (the command line defers Ctrl-C
before that).
"""

from importlib import import_module

# public name -> the module that defines it
_API = {
    "ModelConfig": "attrpatch.arch",
    "attribute": "attrpatch.attribution",
    "EdgeResults": "attrpatch.circuits",
    "attribute_edges": "attrpatch.circuits",
    "faithfulness_curve": "attrpatch.circuits",
    "find_circuit": "attrpatch.circuits",
    "patch_edges": "attrpatch.circuits",
    "patch_edges_each": "attrpatch.circuits",
    "validate_edges": "attrpatch.circuits",
    "verify_edges": "attrpatch.circuits",
    "load_task": "attrpatch.data",
    "load_gguf": "attrpatch.gguf",
    "load_gguf_tokenizer": "attrpatch.gguf",
    "Interventions": "attrpatch.interventions",
    "Patch": "attrpatch.interventions",
    "load_model": "attrpatch.loading",
    "save_model": "attrpatch.loading",
    "Model": "attrpatch.model",
    "enable_compilation_cache": "attrpatch.model",
    "gaussian_noise_corruption": "attrpatch.patching",
    "patch": "attrpatch.patching",
    "top_neurons": "attrpatch.patching",
    "ESTIMATORS": "attrpatch.results",
    "GRANULARITIES": "attrpatch.results",
    "PatchResults": "attrpatch.results",
    "Scores": "attrpatch.results",
    "initialize_distributed": "attrpatch.sharding",
    "make_mesh": "attrpatch.sharding",
    "shard_model": "attrpatch.sharding",
    "all_site_names": "attrpatch.sites",
    "parse_site_name": "attrpatch.sites",
    "METRICS": "attrpatch.task",
    "MetricReference": "attrpatch.task",
    "Task": "attrpatch.task",
    "task_for_model": "attrpatch.tasks",
    "load_tokenizer": "attrpatch.tokenizer",
    "Diagnostics": "attrpatch.validation",
    "Thresholds": "attrpatch.validation",
    "Validation": "attrpatch.validation",
    "diagnose": "attrpatch.validation",
    "validate": "attrpatch.validation",
    "verify_budgeted": "attrpatch.validation",
    "verify_until": "attrpatch.validation",
    # Flax support needs flax (`pip install "attrpatch[flax]"`).
    "FlaxModel": "attrpatch.flax_models",
    "attribute_flax": "attrpatch.flax_models",
    "flax_sites": "attrpatch.flax_models",
    "patch_flax": "attrpatch.flax_models",
    "validate_flax": "attrpatch.flax_models",
}
__all__ = sorted(_API)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'attrpatch' has no attribute {name!r}")
    try:
        module = import_module(_API[name])
    except ImportError as e:
        if _API[name] == "attrpatch.flax_models":
            raise ImportError(f"attrpatch.{name} needs flax: pip install 'attrpatch[flax]'") from e
        raise
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
