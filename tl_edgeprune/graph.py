"""The computational graph: writers, readers and the edges between them, from a model config alone.

Pure: no model, no hooks. Writers are ordered topologically and every reader reads a *prefix* of that
order, which is what lets the engine mix each reader group with a few dense contractions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Bool, Float

from .errors import UnknownNameError, nearest_name

InputNodes = Literal["separate", "merged"]


@dataclass(frozen=True)
class GraphSpec:
    """The few architecture facts the graph depends on."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    positional_embedding_type: str = "standard"

    @property
    def has_pos_writer(self) -> bool:
        # Rotary/alibi have no position vector at all; shortformer adds positions to q and k only.
        return self.positional_embedding_type == "standard"

    @classmethod
    def from_config(cls, cfg: Any) -> "GraphSpec":
        """Read a TransformerLens config (HookedTransformerConfig or TransformerBridgeConfig)."""
        n_heads = int(cfg.n_heads)
        n_kv = getattr(cfg, "n_key_value_heads", None)
        if n_kv is None or getattr(cfg, "ungroup_grouped_query_attention", False):
            n_kv = n_heads
        return cls(
            n_layers=int(cfg.n_layers),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            d_model=int(cfg.d_model),
            attn_only=bool(getattr(cfg, "attn_only", False)),
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
            positional_embedding_type=str(getattr(cfg, "positional_embedding_type", "standard")),
        )


@dataclass(frozen=True)
class WriterChunk:
    """Writers produced by one hook (embeddings, one layer's heads, one MLP): rows [start, stop)."""

    kind: Literal["tok", "pos", "input", "attn", "mlp"]
    layer: int
    start: int
    stop: int


@dataclass(frozen=True)
class ReaderGroup:
    """Readers mixed by one contraction: a layer's q/k/v inputs, an MLP input, or the final read."""

    kind: Literal["attn", "mlp", "logits"]
    layer: int
    start: int
    stop: int
    n_writers: int  # this group reads writers [0, n_writers)


@dataclass(frozen=True)
class Graph:
    """Nodes and edges of a transformer, EAP-IG style: dense [n_writers, n_readers] with a validity mask.

    Names: writers ``tok``/``pos`` (or ``input``), ``a{l}.h{h}``, ``m{l}``; readers ``a{l}.h{h}<q>``,
    ``a{l}.h{h}<k>``/``<v>`` (``a{l}.kv{g}<k>`` under grouped-query attention), ``m{l}``, ``logits``;
    edges ``writer->reader``.
    """

    spec: GraphSpec
    input_nodes: InputNodes
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    writer_chunks: tuple[WriterChunk, ...]
    reader_groups: tuple[ReaderGroup, ...]
    _writer_index: dict[str, int] = field(repr=False, compare=False)
    _reader_index: dict[str, int] = field(repr=False, compare=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: Any, input_nodes: InputNodes = "separate") -> "Graph":
        spec = cfg if isinstance(cfg, GraphSpec) else GraphSpec.from_config(cfg)
        return cls.from_spec(spec, input_nodes)

    @classmethod
    def from_model(cls, model: Any, input_nodes: InputNodes = "separate") -> "Graph":
        return cls.from_config(model.cfg, input_nodes)

    @classmethod
    def from_spec(cls, spec: GraphSpec, input_nodes: InputNodes = "separate") -> "Graph":
        if input_nodes not in ("separate", "merged"):
            raise ValueError(f"input_nodes must be 'separate' or 'merged', got {input_nodes!r}")
        H, G, L = spec.n_heads, spec.n_kv_heads, spec.n_layers
        if H % G != 0:
            raise ValueError(f"n_heads={H} is not a multiple of n_key_value_heads={G}")
        writers: list[str] = []
        chunks: list[WriterChunk] = []

        def add_chunk(kind, layer, names):
            chunks.append(WriterChunk(kind, layer, len(writers), len(writers) + len(names)))
            writers.extend(names)

        if input_nodes == "merged":
            add_chunk("input", -1, ["input"])
        else:
            add_chunk("tok", -1, ["tok"])
            if spec.has_pos_writer:
                add_chunk("pos", -1, ["pos"])

        readers: list[str] = []
        groups: list[ReaderGroup] = []
        kv_name = "h" if G == H else "kv"
        for layer in range(L):
            attn_readers = (
                [f"a{layer}.h{h}<q>" for h in range(H)]
                + [f"a{layer}.{kv_name}{g}<k>" for g in range(G)]
                + [f"a{layer}.{kv_name}{g}<v>" for g in range(G)]
            )
            groups.append(ReaderGroup("attn", layer, len(readers), len(readers) + len(attn_readers), len(writers)))
            readers.extend(attn_readers)
            writers_before_attn = len(writers)
            add_chunk("attn", layer, [f"a{layer}.h{h}" for h in range(H)])
            if not spec.attn_only:
                # Parallel attention+MLP: the MLP reads resid_pre, so not its own layer's heads.
                n_read = writers_before_attn if spec.parallel_attn_mlp else len(writers)
                groups.append(ReaderGroup("mlp", layer, len(readers), len(readers) + 1, n_read))
                readers.append(f"m{layer}")
                add_chunk("mlp", layer, [f"m{layer}"])
        groups.append(ReaderGroup("logits", L, len(readers), len(readers) + 1, len(writers)))
        readers.append("logits")
        return cls(
            spec=spec,
            input_nodes=input_nodes,
            writers=tuple(writers),
            readers=tuple(readers),
            writer_chunks=tuple(chunks),
            reader_groups=tuple(groups),
            _writer_index={n: i for i, n in enumerate(writers)},
            _reader_index={n: i for i, n in enumerate(readers)},
        )

    # ---------------------------------------------------------------- sizes and masks
    @property
    def n_writers(self) -> int:
        return len(self.writers)

    @property
    def n_readers(self) -> int:
        return len(self.readers)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_writers, self.n_readers)

    def valid_mask(self, device: torch.device | str | None = None) -> Bool[torch.Tensor, "writer reader"]:
        """True where an edge exists: each reader group reads a prefix of the writers."""
        valid = torch.zeros(self.shape, dtype=torch.bool, device=device)
        for group in self.reader_groups:
            valid[: group.n_writers, group.start : group.stop] = True
        return valid

    @property
    def n_edges(self) -> int:
        return sum(g.n_writers * (g.stop - g.start) for g in self.reader_groups)

    def ones(self, dtype=torch.float32, device=None) -> Float[torch.Tensor, "writer reader"]:
        """A full-circuit mask (1 on every edge); entries off the valid mask are ignored by the engine."""
        return torch.ones(self.shape, dtype=dtype, device=device)

    def zeros(self, dtype=torch.float32, device=None) -> Float[torch.Tensor, "writer reader"]:
        return torch.zeros(self.shape, dtype=dtype, device=device)

    # ---------------------------------------------------------------- names <-> indices
    def writer_index(self, name: str) -> int:
        try:
            return self._writer_index[name]
        except KeyError:
            raise UnknownNameError(f"no writer node {name!r}{_nearest(name, self.writers)}; writers look like "
                                   f"{self.writers[:3]} ... {self.writers[-1]!r}") from None

    def reader_index(self, name: str) -> int:
        try:
            return self._reader_index[name]
        except KeyError:
            raise UnknownNameError(f"no reader {name!r}{_nearest(name, self.readers)}; readers look like "
                                   f"{self.readers[:2]} ... {self.readers[-1]!r}") from None

    def edge_index(self, name: str) -> tuple[int, int]:
        """``'a0.h1->a2.h3<q>'`` -> (writer row, reader column); raises if the edge does not exist."""
        if not isinstance(name, str) or "->" not in name:
            raise UnknownNameError(f"edge names look like 'a0.h1->m2' or 'tok->a1.h0<q>', got {name!r}")
        src, dst = name.split("->", 1)
        w, r = self.writer_index(src), self.reader_index(dst)
        if w >= self._group_of(r).n_writers:
            raise UnknownNameError(f"{src} is not upstream of {dst}, so {name!r} is not an edge of this graph "
                                   "(an edge runs from a writer to a reader in a later layer)")
        return w, r

    def edge_name(self, writer: int, reader: int) -> str:
        return f"{self.writers[writer]}->{self.readers[reader]}"

    def edge_names(self) -> list[str]:
        """All edges, in [writer, reader] row-major order of the valid mask."""
        idx = self.valid_mask().nonzero().tolist()
        return [self.edge_name(w, r) for w, r in idx]

    def _group_of(self, reader: int) -> ReaderGroup:
        for group in self.reader_groups:
            if group.start <= reader < group.stop:
                return group
        raise IndexError(reader)

    # ---------------------------------------------------------------- node structure
    def reader_node(self, reader: str) -> str:
        """The node a reader belongs to: ``a1.h2<q>`` -> ``a1.h2``; k/v of a KV group -> ``a1.kv0``."""
        return re.sub(r"<[qkv]>$", "", reader)

    def node_of_writer(self, writer: int) -> str:
        return self.writers[writer]

    def readers_of_node(self, node: str) -> list[int]:
        """Reader columns that feed node ``node`` (a head's q and its KV group's k/v; an MLP; logits)."""
        if node == "logits" or re.fullmatch(r"m\d+", node):
            return [self.reader_index(node)]
        m = re.fullmatch(r"a(\d+)\.h(\d+)", node)
        if not m:
            raise KeyError(f"{node!r} is not a node that reads the residual stream")
        layer, head = int(m.group(1)), int(m.group(2))
        spec = self.spec
        if spec.n_kv_heads == spec.n_heads:
            kv = f"a{layer}.h{head}"
        else:
            kv = f"a{layer}.kv{head // (spec.n_heads // spec.n_kv_heads)}"
        return [self.reader_index(f"a{layer}.h{head}<q>"), self.reader_index(f"{kv}<k>"), self.reader_index(f"{kv}<v>")]

    def reader_targets(self, reader: int) -> list[int]:
        """Writer rows fed by a reader column: a head (q), every head of a KV group (k/v), an MLP; [] for logits."""
        name = self.readers[reader]
        if name == "logits":
            return []
        if name.startswith("m"):
            return [self.writer_index(name)]
        m = re.fullmatch(r"a(\d+)\.(h|kv)(\d+)<([qkv])>", name)
        layer, kind, index = int(m.group(1)), m.group(2), int(m.group(3))
        if kind == "h":
            return [self.writer_index(f"a{layer}.h{index}")]
        per_group = self.spec.n_heads // self.spec.n_kv_heads
        return [self.writer_index(f"a{layer}.h{h}") for h in range(index * per_group, (index + 1) * per_group)]

    def same_structure(self, other: "Graph") -> bool:
        """Same writers, readers, edges and width, so masks of one index the other's; the specs may still differ
        in facts that change no edge (a merged-input graph does not depend on the position embedding)."""
        return (self.writers == other.writers and self.readers == other.readers
                and self.reader_groups == other.reader_groups and self.spec.d_model == other.spec.d_model)

    def compatible_with(self, other: "Graph") -> bool:
        return self.spec == other.spec and self.input_nodes == other.input_nodes

    def __repr__(self) -> str:  # keep notebooks readable
        s = self.spec
        return (
            f"Graph({s.n_layers} layers x {s.n_heads} heads (kv {s.n_kv_heads}), input_nodes={self.input_nodes!r}, "
            f"{self.n_writers} writers, {self.n_readers} readers, {self.n_edges} edges)"
        )


def edge_mask_from_names(graph: Graph, names: Sequence[str], dtype=torch.float32, device=None) -> torch.Tensor:
    """A mask that is 1 exactly on the named edges (0 elsewhere)."""
    mask = graph.zeros(dtype=dtype, device=device)
    for name in names:
        mask[graph.edge_index(name)] = 1
    return mask


def _nearest(name: str, names: Sequence[str]) -> str:
    """" (did you mean 'a0.h1'?)" for the closest real name, or nothing."""
    close = nearest_name(name, names)
    return f" (did you mean {close!r}?)" if close else ""
