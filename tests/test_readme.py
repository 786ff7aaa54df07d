"""The README's code runs as written, each block on its own (a reader copies one, not all), and says what it
claims (the canonical reverse circuit)."""

import os
import re

from tl_edgeprune.tracr_models import CANONICAL_CIRCUITS

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    alone = [{} for _ in blocks]
    for block, fresh in zip(blocks, alone):  # a fresh namespace each: no block relies on an earlier one
        exec(compile(block, "README.md", "exec"), fresh)
    namespace = {**alone[1], **{k: v for k, v in alone[2].items() if k != "task"}}
    out = capsys.readouterr().out
    assert "max logit change from one edge" in out
    assert sorted(namespace["circuit"].edge_names()) == sorted(CANONICAL_CIRCUITS["reverse"])
    assert namespace["circuit"].evaluate(namespace["task"].model, namespace["task"].data(), ablation="zero")["exact_match"] == 1.0
    assert sorted(namespace["acdc_circuit"].edge_names()) == sorted(CANONICAL_CIRCUITS["reverse"])
    # The three methods on one graph and ablation: at equal size (11 edges) Edge Pruning's KL is no worse
    # than EAP's (measured: ~1e-8 against EAP's, printed by benchmarks/methods.py).
    task, data = namespace["task"], namespace["data"]
    ep_kl = namespace["circuit"].evaluate(task.model, data, ablation="zero")["kl"]
    eap_kl = namespace["eap_circuit"].evaluate(task.model, data, ablation="zero")["kl"]
    assert namespace["eap_circuit"].n_edges == namespace["circuit"].n_edges == 11
    assert ep_kl <= eap_kl
    assert (tmp_path / "reverse_circuit.json").exists()
