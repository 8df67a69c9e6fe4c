"""Device meshes: prompts and patched runs over ``data``, heads and MLP width over ``model``.

JAX is the distributed engine: the engines place the parameters by :data:`PARAM_AXES`, constrain
their batch-like axes (prompts, stacks of exact-patching chunks) to ``data``, and let GSPMD
partition the jitted computations and insert the collectives. Nothing here schedules work.

- ``data``: AtP's prompts (micro-batches are padded to a multiple of the axis, padding rows
  weighted 0) and exact patching's chunks of patched runs (each device takes its share).
- ``model`` (Megatron style): ``W_Q``/``W_K``/``W_V``/``W_O`` and their biases by head,
  ``W_in``/``W_gate``/``W_out`` by MLP neuron, ``W_E``/``W_U`` by vocabulary. A dimension that
  the axis does not divide (say 2 kv heads on a model axis of 4) is **replicated** for that
  parameter: correct, and listed by :func:`replicated_params`.

Multi-host: :func:`initialize_distributed` once per process, then a mesh over every process's
devices (:func:`make_mesh`); every process runs the same program, and results come back to each
process whole (:func:`to_host`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")

# Parameter key -> the mesh axis of each array dimension (None: replicated). Block weights have
# a leading layer axis. Keys not listed (norm weights, position embeddings, residual-stream
# biases) are replicated.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "W_E": ("model", None),  # [d_vocab, d_model]
    "W_U": (None, "model"),  # [d_model, d_vocab]
    "blocks.W_Q": (None, None, "model", None),  # [L, d_model, head, d_head]
    "blocks.W_K": (None, None, "model", None),  # [L, d_model, kv_head, d_head]
    "blocks.W_V": (None, None, "model", None),
    "blocks.b_Q": (None, "model", None),  # [L, head, d_head]
    "blocks.b_K": (None, "model", None),
    "blocks.b_V": (None, "model", None),
    "blocks.W_O": (None, "model", None, None),  # [L, head, d_head, d_model]
    "blocks.W_in": (None, None, "model"),  # [L, d_model, d_mlp]
    "blocks.W_gate": (None, None, "model"),
    "blocks.b_in": (None, "model"),  # [L, d_mlp]
    "blocks.b_gate": (None, "model"),
    "blocks.W_out": (None, "model", None),  # [L, d_mlp, d_model]
}


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over `devices` (default: every device of every process).

    `data` defaults to ``len(devices) // model``. Raises `ValueError` where the sizes do not fit
    the devices."""
    devices = list(jax.devices() if devices is None else devices)
    for name, value in (("data", data), ("model", model)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)
                                  or value < 1):
            raise ValueError(f"mesh axis {name} must be a positive integer, got {value!r}")
    if data is None:
        data = max(len(devices) // model, 1)
    if data * model > len(devices):
        raise ValueError(
            f"a mesh of data={data} x model={model} needs {data * model} devices; "
            f"{len(devices)} are visible (on CPU, simulate more with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={data * model})"
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def parse_mesh(text: str) -> tuple[int, int]:
    """``"data=D,model=M"`` (either may be left out: 1) -> (D, M)."""
    sizes = {"data": 1, "model": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh {text!r}: expected data=D,model=M with positive integers")
        sizes[name.strip()] = int(value)
    return sizes["data"], sizes["model"]


def check_mesh(mesh: Mesh | None) -> Mesh | None:
    """`mesh` with automatic (GSPMD) axis types, after checking its axis names."""
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh (see attrpatch.make_mesh), got {mesh!r}")
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh axes must be named {AXES}, got {tuple(mesh.axis_names)}; "
                         "build one with attrpatch.make_mesh(data=D, model=M)")
    if any(t != AxisType.Auto for t in mesh.axis_types):
        mesh = Mesh(mesh.devices, AXES, axis_types=(AxisType.Auto, AxisType.Auto))
    return mesh


def param_spec(key: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The `PartitionSpec` of parameter `key` (``"blocks.W_Q"``, ...) on `mesh`: its
    :data:`PARAM_AXES` entry, with every dimension the axis does not divide replicated."""
    axes = PARAM_AXES.get(key, (None,) * len(shape))
    return P(*(a if a is not None and n % mesh.shape[a] == 0 else None
               for a, n in zip(axes, shape, strict=True)))


def _flat_key(path) -> str:
    """A parameter's pytree path as its :data:`PARAM_AXES` key: ``"W_E"``, ``"blocks.W_Q"``, ..."""
    return ".".join(str(k.key) for k in path)


def param_shardings(params: dict, mesh: Mesh) -> dict:
    """A pytree like `params` of `NamedSharding` s (the sharding rules applied)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(_flat_key(path), x.shape, mesh)), params)


def replicated_params(params: dict, mesh: Mesh) -> list[str]:
    """Parameters a rule would shard over ``model`` but that the axis does not divide."""
    if mesh.shape["model"] == 1:
        return []
    keys = [(_flat_key(path), x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [k for k, x in keys
            if "model" in PARAM_AXES.get(k, ()) and "model" not in param_spec(k, x.shape, mesh)]


def shard_model(model, mesh: Mesh | None):
    """`model` with its parameters placed on `mesh` by the sharding rules (None: unchanged).
    Cheap when they already are: call it once for a big model, and pass the result around.

    Abstract parameters (`jax.ShapeDtypeStruct` leaves, from `jax.eval_shape`) get the
    shardings attached instead: enough to compile and measure a model too big to hold
    (:func:`attrpatch.attribution.attribute_memory`)."""
    mesh = check_mesh(mesh)
    if mesh is None:
        return model
    shardings = param_shardings(model.params, mesh)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(model.params)):
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              model.params, shardings)
    else:
        params = jax.device_put(model.params, shardings)
    return type(model)(model.config, params)


def replicate(tree, mesh: Mesh | None):
    """Every array of `tree` whole on every device of `mesh` (None: unchanged)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(check_mesh(mesh), P()))


def shard_leading(tree, mesh: Mesh | None):
    """Every array of `tree` split over ``data`` along its first axis where the axis divides it,
    else replicated (None: unchanged)."""
    if mesh is None:
        return tree
    mesh = check_mesh(mesh)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        spec = P("data") if x.ndim and x.shape[0] % mesh.shape["data"] == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)


def leading_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """The sharding that splits a batch-like first axis over ``data`` (None without a mesh)."""
    return None if mesh is None else NamedSharding(check_mesh(mesh), P("data"))


def constrain(x, sharding: NamedSharding | None):
    """`jax.lax.with_sharding_constraint` inside a jitted body, a no-op for `sharding` None."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def to_host(tree):
    """Every array of `tree` as numpy, whole, on every process (a multi-host array is gathered)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def mesh_record(mesh: Mesh | None) -> dict:
    """What `summary.json` says about the mesh: axis sizes, devices, processes."""
    if mesh is None:
        return {"data": 1, "model": 1, "devices": 1, "processes": 1}
    return {"data": int(mesh.shape["data"]), "model": int(mesh.shape["model"]),
            "devices": int(mesh.devices.size),
            "processes": len({d.process_index for d in mesh.devices.flat})}


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process JAX run (`jax.distributed.initialize`): automatic on TPU pods and
    SLURM; elsewhere give the coordinator's ``host:port``, the process count and this process's
    id (or set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). Call it
    before any other JAX call, in every process. On CPU the processes talk through gloo."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("multi-process runs need all of the coordinator address, the number of "
                         "processes and this process's id (or none of them, on a TPU pod)")
    if process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


@contextmanager
def out_of_memory_advice(advice: str) -> Iterator[None]:
    """Re-raise a device's out-of-memory error (XLA's ``RESOURCE_EXHAUSTED``) as a `MemoryError`
    that says what to lower. (On CPU the operating system stops the process instead.)"""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        raise MemoryError(f"the device ran out of memory: {advice}") from e


def is_writer() -> bool:
    """True in the process that writes results (process 0)."""
    return jax.process_index() == 0
