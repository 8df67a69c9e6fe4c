"""The computational graph edges live on (EAP-IG's conventions, so scores can be compared).

**Sources** (what writes to the residual stream): ``input`` (the embeddings, positions included),
each attention head's output ``a{l}.h{h}`` (its slice of W_O applied to its z; the attention bias
is a constant and belongs to no source) and each MLP ``m{l}``.

**Destinations** (what reads it): each query head's query input ``a{l}.h{h}<q>``, each key/value
head's key and value inputs ``a{l}.h{k}<k>`` / ``a{l}.h{k}<v>``, each MLP's input ``m{l}`` and
the unembedding, ``logits``.

Choices, named so users can compare:

- Grouped- and multi-query attention: keys and values are read **per kv head** (``h{k}`` counts
  kv heads), as TransformerLens's ``k``/``v`` granularities are. A kv head's ``<k>`` input feeds
  every query head of its group.
- Sandwich norms (Gemma 2's post-attention norm) mix a layer's heads nonlinearly before the
  residual stream, so a head's output is not a write of its own: there the attention source is
  the whole layer, ``a{l}`` (what ``hook_attn_out`` holds). Destinations stay per head.
- An edge joins a source to every destination that reads the residual stream after the source
  writes it: any later layer, and in a sequential block the same layer's MLP reads that layer's
  heads (a parallel block's, as in GPT-NeoX/Pythia, does not).

Index layout (used by every array of edge scores): sources are ``input`` then, per layer, its
attention sources then its MLP; destinations are, per layer, q heads, k heads, v heads, the MLP,
then ``logits`` last.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import numpy as np

from attrpatch.arch.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class EdgeGraph:
    """Sources, destinations and which edges exist, for one model config."""

    config: ModelConfig

    @property
    def head_sources(self) -> bool:
        """True where each head is a source of its own (no sandwich norm after attention)."""
        return not self.config.post_norms

    @property
    def attn_sources_per_layer(self) -> int:
        return self.config.n_heads if self.head_sources else 1

    @property
    def sources_per_layer(self) -> int:
        return self.attn_sources_per_layer + (0 if self.config.attn_only else 1)

    @property
    def destinations_per_layer(self) -> int:
        c = self.config
        return c.n_heads + 2 * c.kv_heads + (0 if c.attn_only else 1)

    def attn_source_slice(self, layer: int) -> slice:
        start = 1 + layer * self.sources_per_layer
        return slice(start, start + self.attn_sources_per_layer)

    def mlp_source_index(self, layer: int) -> int:
        return 1 + layer * self.sources_per_layer + self.attn_sources_per_layer

    def qkv_destination_slices(self, layer: int) -> tuple[slice, slice, slice]:
        c = self.config
        q0 = layer * self.destinations_per_layer
        k0, v0 = q0 + c.n_heads, q0 + c.n_heads + c.kv_heads
        return slice(q0, k0), slice(k0, v0), slice(v0, v0 + c.kv_heads)

    def mlp_destination_index(self, layer: int) -> int:
        return (layer + 1) * self.destinations_per_layer - 1

    @cached_property
    def sources(self) -> tuple[str, ...]:
        names = ["input"]
        for layer in range(self.config.n_layers):
            if self.head_sources:
                names += [f"a{layer}.h{h}" for h in range(self.config.n_heads)]
            else:
                names.append(f"a{layer}")
            if not self.config.attn_only:
                names.append(f"m{layer}")
        return tuple(names)

    @cached_property
    def destinations(self) -> tuple[str, ...]:
        c = self.config
        names = []
        for layer in range(c.n_layers):
            names += [f"a{layer}.h{h}<q>" for h in range(c.n_heads)]
            names += [f"a{layer}.h{k}<{kind}>" for kind in "kv" for k in range(c.kv_heads)]
            if not c.attn_only:
                names.append(f"m{layer}")
        return tuple(names + ["logits"])

    @cached_property
    def _times(self) -> tuple[np.ndarray, np.ndarray]:
        """(when each source writes, when each destination reads), in half-layer steps: the
        input writes at 0; layer l's attention reads at 2l+1 and writes then; its MLP reads at
        2l+2 (sequential) or 2l+1 (parallel) and writes at 2l+2; the logits read at 2L+1."""
        c = self.config
        write, read = [0], []
        parallel = c.parallel_attn_mlp
        for layer in range(c.n_layers):
            write += [2 * layer + 1] * self.attn_sources_per_layer
            read += [2 * layer + 1] * (c.n_heads + 2 * c.kv_heads)
            if not c.attn_only:
                write.append(2 * layer + 2)
                read.append(2 * layer + 1 if parallel else 2 * layer + 2)
        read.append(2 * c.n_layers + 1)
        return np.asarray(write), np.asarray(read)

    @cached_property
    def exists(self) -> np.ndarray:
        """bool ``[n_sources, n_destinations]``: which edges the graph has."""
        write, read = self._times
        exists = write[:, None] < read[None, :]
        exists.setflags(write=False)
        return exists

    @property
    def n_edges(self) -> int:
        return int(self.exists.sum())

    def source_index(self, name: str) -> int:
        return _index(self.sources, name, "source")

    def destination_index(self, name: str) -> int:
        return _index(self.destinations, name, "destination")

    def edge_list(self) -> list[tuple[str, str]]:
        """Every edge as a (source, destination) pair, sources in forward order."""
        return [(self.sources[s], self.destinations[d]) for s, d in np.argwhere(self.exists)]

    def mask_of(self, edges, n_pos: int | None = None) -> np.ndarray:
        """float32 ``[n_sources, n_destinations, n_pos]`` (1 on the listed edges) from
        (source, destination) pairs, or (source, destination, position) triples (`n_pos` given).
        Raises `ValueError` for an unknown name, a pair the graph has no edge for, or a
        position outside the prompt."""
        n = 1 if n_pos is None else n_pos
        mask = np.zeros((len(self.sources), len(self.destinations), n), np.float32)
        for edge in edges:
            edge = tuple(edge)
            if len(edge) not in (2, 3):
                raise ValueError(f"an edge is (source, destination) or (source, destination, "
                                 f"position), got {edge!r}")
            s, d = self.source_index(edge[0]), self.destination_index(edge[1])
            if not self.exists[s, d]:
                raise ValueError(f"there is no edge {edge[0]} -> {edge[1]}: {edge[1]} does not "
                                 f"read the residual stream after {edge[0]} writes it")
            if len(edge) == 3:
                p = edge[2]
                if n_pos is None or not (isinstance(p, int | np.integer) and 0 <= p < n_pos):
                    raise ValueError(f"edge {edge!r}: position must be an integer in "
                                     f"0..{(n_pos or 1) - 1}")
                mask[s, d, p] = 1.0
            else:
                mask[s, d, :] = 1.0
        return mask


def _index(names: tuple[str, ...], name: str, kind: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        sample = ", ".join(names[:3] + names[-2:])
        raise ValueError(f"unknown {kind} {name!r}; names look like {sample}") from None
