"""The computational graph: writers, readers and the edges between them, from a model config alone.

Pure: no model, no hooks. Writers are ordered topologically and every reader reads a *prefix* of that
order, which is what lets the engine mix each reader group with a few dense contractions.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Bool, Float

from .errors import EdgePruneError, UnknownNameError, nearest_name

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

    A *positional* graph (``position_classes`` named) has one copy of every reader per class of positions,
    ``a2.h3<q>@END``: that reader column mixes only at the positions of class END. Columns are class-major,
    ``[class, base reader]``, so class c's columns are ``c·n_base_readers + [0, n_base_readers)``; ``reader_groups``
    describe the base readers (one class) and are shared by every class.
    """

    spec: GraphSpec
    input_nodes: InputNodes
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    writer_chunks: tuple[WriterChunk, ...]
    reader_groups: tuple[ReaderGroup, ...]
    position_classes: tuple[str, ...]
    _writer_index: dict[str, int] = field(repr=False, compare=False)
    _reader_index: dict[str, int] = field(repr=False, compare=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: Any, input_nodes: InputNodes = "separate",
                    position_classes: Sequence[str] = ()) -> "Graph":
        spec = cfg if isinstance(cfg, GraphSpec) else GraphSpec.from_config(cfg)
        return cls.from_spec(spec, input_nodes, position_classes)

    @classmethod
    def from_model(cls, model: Any, input_nodes: InputNodes = "separate",
                   position_classes: Sequence[str] = ()) -> "Graph":
        """``position_classes``: names of the classes of positions (e.g. a task's ``data.position_names``) for a
        positional graph; empty for the ordinary one."""
        return cls.from_config(model.cfg, input_nodes, position_classes)

    @classmethod
    def from_spec(cls, spec: GraphSpec, input_nodes: InputNodes = "separate",
                  position_classes: Sequence[str] = ()) -> "Graph":
        classes = check_position_classes(position_classes)
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
        if classes:
            readers = [f"{name}@{c}" for c in classes for name in readers]
        return cls(
            spec=spec,
            input_nodes=input_nodes,
            writers=tuple(writers),
            readers=tuple(readers),
            writer_chunks=tuple(chunks),
            reader_groups=tuple(groups),
            position_classes=classes,
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

    @property
    def positional(self) -> bool:
        return bool(self.position_classes)

    @property
    def n_classes(self) -> int:
        """Copies of each reader: the number of position classes, 1 for the ordinary graph."""
        return max(1, len(self.position_classes))

    @property
    def n_base_readers(self) -> int:
        return self.n_readers // self.n_classes

    def reader_class(self, reader: int) -> int:
        """The position class of a reader column (0 in the ordinary graph)."""
        return reader // self.n_base_readers

    def reader_columns(self, group: ReaderGroup) -> list[int]:
        """Every column of a reader group, class by class."""
        base = self.n_base_readers
        return [c * base + r for c in range(self.n_classes) for r in range(group.start, group.stop)]

    def reader_columns_before(self, layer: int) -> list[int]:
        """Every column of the reader groups before ``layer`` (what a forward started at ``layer`` never reads)."""
        return [c for group in self.reader_groups if group.layer < layer for c in self.reader_columns(group)]

    def valid_mask(self, device: torch.device | str | None = None) -> Bool[torch.Tensor, "writer reader"]:
        """True where an edge exists: each reader group reads a prefix of the writers (in every class)."""
        valid = torch.zeros(self.shape, dtype=torch.bool, device=device)
        base = self.n_base_readers
        for c in range(self.n_classes):
            for group in self.reader_groups:
                valid[: group.n_writers, c * base + group.start : c * base + group.stop] = True
        return valid

    @property
    def n_edges(self) -> int:
        return self.n_classes * sum(g.n_writers * (g.stop - g.start) for g in self.reader_groups)

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
        base = reader % self.n_base_readers
        for group in self.reader_groups:
            if group.start <= base < group.stop:
                return group
        raise IndexError(reader)

    # ---------------------------------------------------------------- node structure
    def reader_node(self, reader: str) -> str:
        """The node a reader belongs to: ``a1.h2<q>`` (or ``a1.h2<q>@END``) -> ``a1.h2``; k/v of a KV group ->
        ``a1.kv0``."""
        return re.sub(r"<[qkv]>$", "", base_reader_name(reader))

    def node_of_writer(self, writer: int) -> str:
        return self.writers[writer]

    def readers_of_node(self, node: str) -> list[int]:
        """Reader columns that feed node ``node`` (a head's q and its KV group's k/v; an MLP; logits), in every
        position class."""
        if self.positional:
            return [c * self.n_base_readers + r for c in range(self.n_classes)
                    for r in self._base_graph().readers_of_node(node)]
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
        name = base_reader_name(self.readers[reader])
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
        return (self.spec == other.spec and self.input_nodes == other.input_nodes
                and self.position_classes == other.position_classes)

    @functools.cached_property
    def _base(self) -> "Graph":
        return Graph.from_spec(self.spec, self.input_nodes)

    def _base_graph(self) -> "Graph":
        """The same graph without position classes (one class)."""
        return self._base if self.positional else self

    def with_position_classes(self, position_classes: Sequence[str]) -> "Graph":
        return Graph.from_spec(self.spec, self.input_nodes, position_classes)

    def __repr__(self) -> str:  # keep notebooks readable
        s = self.spec
        classes = f", {self.n_classes} position classes {list(self.position_classes)}" if self.positional else ""
        return (
            f"Graph({s.n_layers} layers x {s.n_heads} heads (kv {s.n_kv_heads}), input_nodes={self.input_nodes!r}"
            f"{classes}, {self.n_writers} writers, {self.n_readers} readers, {self.n_edges} edges)"
        )


def base_reader_name(reader: str) -> str:
    """``a2.h3<q>@END`` -> ``a2.h3<q>`` (the reader without its position class)."""
    return reader.split("@", 1)[0]


def check_position_classes(position_classes: Any) -> tuple[str, ...]:
    """Distinct, non-empty names that cannot be confused with the rest of an edge name."""
    if position_classes is None:
        return ()
    if isinstance(position_classes, str) or not all(isinstance(c, str) for c in position_classes):
        raise EdgePruneError(f"position_classes must be a list of names such as ['IO', 'S1', 'S2', 'END', 'other'], "
                             f"got {position_classes!r}")
    classes = tuple(position_classes)
    bad = [c for c in classes if not c or any(ch in c for ch in "@<>") or c != c.strip()]
    if bad:
        raise EdgePruneError(f"position class names must be non-empty and free of '@', '<', '>' and surrounding "
                             f"spaces (they end edge names, 'a0.h1->m2@END'); got {bad}")
    if len(set(classes)) != len(classes):
        raise EdgePruneError(f"position class names must be distinct, got {list(classes)}")
    if len(classes) == 1:
        raise EdgePruneError(f"one position class {list(classes)} is the ordinary graph: pass no position_classes")
    return classes


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
