"""attrpatch: attribution patching and exact activation patching in JAX, validated against each other."""

from attrpatch.arch import ModelConfig
from attrpatch.attribution import attribute
from attrpatch.data import load_task
from attrpatch.interventions import Interventions, Patch
from attrpatch.loading import load_model, save_model
from attrpatch.model import Model
from attrpatch.patching import gaussian_noise_corruption, patch, top_neurons
from attrpatch.results import ESTIMATORS, GRANULARITIES, PatchResults, Scores
from attrpatch.sites import all_site_names, parse_site_name
from attrpatch.task import METRICS, MetricReference, Task
from attrpatch.tasks import task_for_model
from attrpatch.tokenizer import load_tokenizer
from attrpatch.validation import (
    Diagnostics,
    Thresholds,
    Validation,
    diagnose,
    validate,
    verify_budgeted,
    verify_until,
)

__all__ = [
    "Diagnostics",
    "ESTIMATORS",
    "GRANULARITIES",
    "Interventions",
    "METRICS",
    "MetricReference",
    "Model",
    "ModelConfig",
    "Patch",
    "PatchResults",
    "Scores",
    "Task",
    "Thresholds",
    "Validation",
    "all_site_names",
    "attribute",
    "diagnose",
    "gaussian_noise_corruption",
    "load_model",
    "load_task",
    "load_tokenizer",
    "parse_site_name",
    "patch",
    "save_model",
    "task_for_model",
    "top_neurons",
    "validate",
    "verify_budgeted",
    "verify_until",
]
__version__ = "0.1.0"

# Flax support loads flax only when first used (`pip install "attrpatch[flax]"`).
_FLAX_NAMES = ("FlaxModel", "attribute_flax", "flax_sites", "patch_flax", "validate_flax")
__all__ += list(_FLAX_NAMES)


def __getattr__(name):
    if name in _FLAX_NAMES:
        try:
            from attrpatch import flax_models
        except ImportError as e:
            raise ImportError(f"attrpatch.{name} needs flax: pip install 'attrpatch[flax]'") from e
        return getattr(flax_models, name)
    raise AttributeError(f"module 'attrpatch' has no attribute {name!r}")
