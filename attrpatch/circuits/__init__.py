"""Edges and circuits: EAP and EAP-IG scores, exact edge and path patching, circuit discovery
and faithfulness, edge-level validation (graph conventions in :mod:`attrpatch.circuits.graph`)."""

from attrpatch.circuits.discovery import (
    EdgeFlag,
    EdgeValidation,
    FaithfulnessPoint,
    faithfulness_curve,
    find_circuit,
    validate_edges,
    verify_edges,
)
from attrpatch.circuits.edges import (
    EDGE_METHODS,
    EdgeResults,
    attribute_edges,
    edge_method_cost,
    patch_edges,
    patch_edges_each,
)
from attrpatch.circuits.graph import EdgeGraph

__all__ = [
    "EDGE_METHODS", "EdgeFlag", "EdgeGraph", "EdgeResults", "EdgeValidation", "FaithfulnessPoint",
    "attribute_edges", "edge_method_cost", "faithfulness_curve", "find_circuit", "patch_edges",
    "patch_edges_each", "validate_edges", "verify_edges",
]
