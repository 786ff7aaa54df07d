"""Plain-TransformerLens references the engine is tested against: manual edge patching and EAP.

Written directly with run_with_cache / run_with_hooks, sharing no code with the engine.
"""

from __future__ import annotations

import contextlib
import re

import torch


@contextlib.contextmanager
def split_flags(model, mlp_in: bool):
    """Turn on the split-q/k/v and hook_mlp_in flags for a plain-hooks run, then restore them."""
    old_split, old_mlp = model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in
    model.set_use_split_qkv_input(True)
    if mlp_in:
        model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(old_split)
        if mlp_in:
            model.set_use_hook_mlp_in(old_mlp)


def writer_output(model, cache, writer: str) -> torch.Tensor:
    """A writer's output [batch, pos, d_model] read from a plain cache."""
    if writer == "tok":
        return cache["hook_embed"]
    if writer == "pos":
        return cache["hook_pos_embed"]
    if writer == "input":
        return cache["blocks.0.hook_resid_pre"]
    m = re.fullmatch(r"a(\d+)\.h(\d+)", writer)
    if m:
        layer, head = int(m.group(1)), int(m.group(2))
        return cache[f"blocks.{layer}.attn.hook_z"][:, :, head] @ model.blocks[layer].attn.W_O[head]
    layer = int(re.fullmatch(r"m(\d+)", writer).group(1))
    return cache[f"blocks.{layer}.hook_mlp_out"]


def reader_hook_point(model, reader: str) -> tuple[str, int | None]:
    """(hook name, head/group slot or None) where a reader's input can be patched."""
    if reader == "logits":
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None
    m = re.fullmatch(r"m(\d+)", reader)
    if m:
        return f"blocks.{m.group(1)}.hook_mlp_in", None
    m = re.fullmatch(r"a(\d+)\.(?:h|kv)(\d+)<([qkv])>", reader)
    return f"blocks.{m.group(1)}.hook_{m.group(3)}_input", int(m.group(2))


def writer_cache_names(model) -> list[str]:
    names = ["hook_embed", "blocks.0.hook_resid_pre"]
    if model.cfg.positional_embedding_type == "standard":
        names.append("hook_pos_embed")
    for layer in range(model.cfg.n_layers):
        names.append(f"blocks.{layer}.attn.hook_z")
        if not model.cfg.attn_only:
            names.append(f"blocks.{layer}.hook_mlp_out")
    return names


def patch_one_edge(model, clean, counterfactual_outputs, edge: str) -> torch.Tensor:
    """Logits with one edge w->r patched: r's input gets ỹ_w instead of y_w, everything else clean.

    counterfactual_outputs(writer) gives ỹ_w ([batch|1, pos|1, d_model]).
    """
    writer, reader = edge.split("->")
    names = writer_cache_names(model)
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    delta = writer_output(model, clean_cache, writer) - counterfactual_outputs(writer)
    hook_name, slot = reader_hook_point(model, reader)

    def patch(x, hook):
        x = x.clone()
        if slot is None:
            x = x - delta
        else:
            x[:, :, slot] = x[:, :, slot] - delta
        return x

    with split_flags(model, mlp_in=not model.cfg.attn_only):
        return model.run_with_hooks(clean, fwd_hooks=[(hook_name, patch)])


def eap_scores(model, graph, clean, counterfactual_outputs, metric) -> torch.Tensor:
    """EAP by hand: score(w->r) = Σ (y_w − ỹ_w) · ∂metric/∂(input of r), from plain hooks."""
    names = writer_cache_names(model)
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    grads: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}

    def keeper(name):
        def keep(x, hook):  # on a bridge hook.name is the canonical name, so bind ours
            x = x.clone()
            x.retain_grad()  # stays in the graph: gradients through later readers still arrive
            saved[name] = x
            return x

        return keep

    hook_names = sorted({reader_hook_point(model, r)[0] for r in graph.readers})
    with split_flags(model, mlp_in=not model.cfg.attn_only):
        logits = model.run_with_hooks(clean, fwd_hooks=[(n, keeper(n)) for n in hook_names])
    metric(logits).backward()
    for name, x in saved.items():
        grads[name] = x.grad
    scores = torch.zeros(graph.shape, dtype=torch.float64)
    valid = graph.valid_mask()
    for w, r in valid.nonzero().tolist():
        hook_name, slot = reader_hook_point(model, graph.readers[r])
        g = grads[hook_name] if slot is None else grads[hook_name][:, :, slot]
        d = writer_output(model, clean_cache, graph.writers[w]) - counterfactual_outputs(graph.writers[w])
        scores[w, r] = (d.double() * g.double()).sum()
    return scores


def patch_one_edge_at(model, clean, counterfactual_outputs, edge: str, at: torch.Tensor) -> torch.Tensor:
    """Logits with one edge w->r patched at the positions ``at`` ([batch, pos] bool) only: r's input there gets ỹ_w
    instead of y_w; at every other position, and everywhere else, the clean run."""
    writer, reader = edge.split("->")
    names = writer_cache_names(model)
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    delta = writer_output(model, clean_cache, writer) - counterfactual_outputs(writer)
    delta = delta.expand(*clean.shape, delta.shape[-1]) * at[:, :, None].to(delta.dtype)
    hook_name, slot = reader_hook_point(model, reader)

    def patch(x, hook):
        x = x.clone()
        if slot is None:
            x = x - delta
        else:
            x[:, :, slot] = x[:, :, slot] - delta
        return x

    with split_flags(model, mlp_in=not model.cfg.attn_only):
        return model.run_with_hooks(clean, fwd_hooks=[(hook_name, patch)])


def positional_eap_scores(model, graph, clean, counterfactual_outputs, metric, classes: torch.Tensor) -> torch.Tensor:
    """Per-position EAP by hand: score(w->r@c) = Σ over the positions of class c of (y_w − ỹ_w)·∂metric/∂(input of r),
    on a positional graph (reader names ``r@c``), from plain hooks."""
    names = writer_cache_names(model)
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    saved: dict[str, torch.Tensor] = {}

    def keeper(name):
        def keep(x, hook):
            x = x.clone()
            x.retain_grad()
            saved[name] = x
            return x

        return keep

    base_names = [r.split("@")[0] for r in graph.readers]
    hook_names = sorted({reader_hook_point(model, r)[0] for r in base_names})
    with split_flags(model, mlp_in=not model.cfg.attn_only):
        logits = model.run_with_hooks(clean, fwd_hooks=[(n, keeper(n)) for n in hook_names])
    metric(logits).backward()
    scores = torch.zeros(graph.shape, dtype=torch.float64)
    for w, r in graph.valid_mask().nonzero().tolist():
        base, cls = graph.readers[r].split("@")
        at = (classes == graph.position_classes.index(cls)).double()[:, :, None]
        hook_name, slot = reader_hook_point(model, base)
        g = saved[hook_name].grad if slot is None else saved[hook_name].grad[:, :, slot]
        d = writer_output(model, clean_cache, graph.writers[w]) - counterfactual_outputs(graph.writers[w])
        scores[w, r] = (d.double() * g.double() * at).sum()
    return scores


def patch_edges(model, clean, counterfactual_outputs, edges) -> torch.Tensor:
    """Logits with every edge w->r in ``edges`` removed at once: r's input gets ỹ_w instead of y_w, where y_w is
    w's output in this same run (upstream removals change it), as Edge Pruning and ACDC define a circuit."""
    removed: dict[str, list[str]] = {}
    for edge in edges:
        writer, reader = edge.split("->")
        removed.setdefault(reader, []).append(writer)
    names = writer_cache_names(model)
    live: dict[str, torch.Tensor] = {}

    def capture(x, hook, name):
        live[name] = x
        return x

    def patch_reader(readers):
        def patch(x, hook):
            x = x.clone()
            for reader in readers:
                slot = reader_hook_point(model, reader)[1]
                delta = sum(writer_output(model, live, w) - counterfactual_outputs(w) for w in removed[reader])
                if slot is None:
                    x = x - delta
                else:
                    x[:, :, slot] = x[:, :, slot] - delta
            return x

        return patch

    by_hook: dict[str, list[str]] = {}
    for reader in removed:
        by_hook.setdefault(reader_hook_point(model, reader)[0], []).append(reader)
    hooks = [(n, lambda x, hook, n=n: capture(x, hook, n)) for n in names]
    hooks += [(n, patch_reader(readers)) for n, readers in by_hook.items()]
    with split_flags(model, mlp_in=not model.cfg.attn_only):
        return model.run_with_hooks(clean, fwd_hooks=hooks)
