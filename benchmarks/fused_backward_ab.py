"""A/B of the fused q/k/v arithmetic: the tenth session's (var_mean, autograd's backward; kept below as ``old``) against
today's ``fused_qkv.mixed_projection``, in the Edge Pruning core step, interleaved with the frozen forward+backward.

    python benchmarks/fused_backward_ab.py [gpt2-shape|smollm2] [batch] [rounds]
"""
import sys, time, statistics, torch
import os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tl_edgeprune as tep
import tl_edgeprune.fused_qkv as F
import tl_edgeprune.engine as E
from tl_edgeprune.edge_pruning import frozen_parameters
from benchmarks.engine import load_model, make_batch, edge_pruning_step, residual_grad_step
torch.set_num_threads(1)
new = F.mixed_projection

def old(part, resid, norm, W, b, scratch=None, grad_into=None):  # grad_into: a later addition, unused here
    n, batch, pos, d = part.shape
    e = W.shape[-1]
    x = resid + part
    if norm.kind == "none":
        return (torch.bmm(x.view(n, batch * pos, d), W).view(n, batch, pos, e) + b[:, None, None, :]).permute(1, 2, 0, 3)
    Wg = W if norm.weight is None else W * norm.weight[None, :, None]
    const = b if norm.bias is None else b + torch.einsum("d,nde->ne", norm.bias, W)
    proj = torch.bmm(x.view(n, batch * pos, d), Wg).view(n, batch, pos, e)
    if norm.kind == "ln":
        var, mean = torch.var_mean(x, dim=-1, correction=0)
        proj = proj - mean[..., None] * Wg.sum(1)[:, None, None, :]
    else:
        var = torch.linalg.vector_norm(x, dim=-1).square() / d
    out = torch.rsqrt(var + norm.eps)[..., None] * proj + const[:, None, None, :]
    return out.permute(1, 2, 0, 3)

model_name = sys.argv[1] if len(sys.argv) > 1 else "gpt2-shape"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 32
model = load_model(model_name); clean, corrupted = make_batch(model, batch, 20)
res = {"frozen": [], "new": [], "old": []}
with frozen_parameters(model):
    fr = residual_grad_step(model, clean)
    with tep.masked(model) as mm:
        step = edge_pruning_step(mm, clean, corrupted)
        def timed(f):
            t = time.perf_counter(); f(); return time.perf_counter() - t
        for which in ("new", "old"):
            E.mixed_projection = new if which == "new" else old
            step()
        for r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 4):
            res["frozen"].append(timed(fr))
            for which in ("new", "old"):
                E.mixed_projection = new if which == "new" else old
                res[which].append(timed(step))
for k, v in res.items():
    print(k, "median", round(statistics.median(v), 3), "min", round(min(v), 3), "max", round(max(v), 3))
for k in ("new", "old"):
    rs = sorted(a / f for a, f in zip(res[k], res["frozen"]))
    print(f"{k} / frozen: median {statistics.median(rs):.2f}x (min {rs[0]:.2f}, max {rs[-1]:.2f})")
rs = sorted(a / b for a, b in zip(res["new"], res["old"]))
print(f"new / old: median {statistics.median(rs):.2f}x (min {rs[0]:.2f}, max {rs[-1]:.2f})")
