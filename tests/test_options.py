"""The public methods' options: one flat namespace, explicit documented keywords, typo suggestions, short-run ramps."""

import dataclasses
import importlib
import inspect
import os
import warnings

import pytest

import tl_edgeprune as tep
from tl_edgeprune.edge_pruning import EdgePruningConfig
from tl_edgeprune.options import OptionError


@pytest.fixture(scope="module")
def reverse():
    task = tep.load_tracr("reverse")
    return task.model, task.data()


def test_methods_are_functions_of_the_package_and_their_modules_do_not_shadow_them():
    from tl_edgeprune.eap import eap  # noqa: F401  (what used to rebind tep.eap to the module)

    for name in ("tl_edgeprune.eap", "tl_edgeprune.acdc", "tl_edgeprune.hap", "tl_edgeprune.edge_pruning"):
        importlib.import_module(name)
    for name in ("eap", "acdc", "hap", "edge_pruning", "attribution_init"):
        assert inspect.isfunction(inspect.unwrap(getattr(tep, name))), name
        assert name in tep.__all__
    assert tep.eap is importlib.import_module("tl_edgeprune.eap").eap


def test_every_setting_is_an_explicit_documented_keyword_with_the_config_default():
    params = inspect.signature(tep.edge_pruning).parameters
    doc = inspect.getdoc(tep.edge_pruning)
    for f in dataclasses.fields(EdgePruningConfig):
        assert f.name in params, f"{f.name} is not a keyword of edge_pruning"
        assert params[f.name].kind in (params[f.name].KEYWORD_ONLY, params[f.name].POSITIONAL_OR_KEYWORD)
        assert params[f.name].default == f.default, f"{f.name}: signature {params[f.name].default!r}, config {f.default!r}"
        assert params[f.name].annotation is not inspect.Parameter.empty, f.name
        assert f"{f.name}" in doc, f"{f.name} is not documented in edge_pruning's docstring"
    # help() shows the real signature, not the checking wrapper's (*args, **kwargs)
    assert "**" not in str(inspect.signature(tep.edge_pruning))


def test_the_package_ships_py_typed():
    assert os.path.exists(os.path.join(os.path.dirname(tep.__file__), "py.typed"))


@pytest.mark.parametrize("call, wrong, right", [
    (lambda m, d: tep.edge_pruning(m, d, learning_rate=0.1), "learning_rate", "lr"),
    (lambda m, d: tep.edge_pruning(m, d, stpes=10), "stpes", "steps"),
    (lambda m, d: tep.edge_pruning(m, d, target=0.9), "target", "target_sparsity"),
    (lambda m, d: tep.hap(m, d, 0.9, keep=0.2, batch=8), "batch", "batch_size"),
    (lambda m, d: tep.hap(m, d, 0.9, keep=0.2, lr_warmpu=3), "lr_warmpu", "lr_warmup"),
    (lambda m, d: tep.eap(m, d, ig=5), "ig", "ig_steps"),
    (lambda m, d: tep.acdc(m, d, 0.01, treshold=0.1), "treshold", "threshold"),
])
def test_a_misspelt_option_fails_before_any_work_naming_the_right_one(call, wrong, right):
    # model and data are None: the check must come before either is touched
    with pytest.raises(OptionError) as info:
        call(None, None)
    message = str(info.value)
    assert f"{wrong!r}" in message and f"did you mean {right!r}" in message
    assert isinstance(info.value, TypeError) and isinstance(info.value, tep.EdgePruneError)


def test_an_unknown_option_with_no_near_name_lists_the_options():
    with pytest.raises(OptionError, match="Its options: target_sparsity, steps"):
        tep.edge_pruning(None, None, zzz=1)


def test_warm_ups_scale_with_steps_so_a_short_run_reaches_its_target(reverse):
    model, data = reverse
    assert EdgePruningConfig().sparsity_warmup == 2500 and EdgePruningConfig().lr_warmup == 200  # the reference's
    assert EdgePruningConfig.reference().sparsity_warmup == 2500
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default warm-up must not warn
        result = tep.edge_pruning(model, data, 0.9, steps=6, ablation="zero", progress=False)
    assert result.config.sparsity_warmup == 5 and EdgePruningConfig(steps=2).sparsity_warmup == 1 and result.config.lr_warmup == 0
    assert result.history["target"][-1] == pytest.approx(0.9)


def test_a_warm_up_longer_than_the_run_warns_with_the_target_it_will_reach(reverse):
    model, data = reverse
    with pytest.warns(UserWarning, match=r"sparsity_warmup=2500 is longer than steps=5.*only reached 0\.002, not target_sparsity=0\.95"):
        tep.edge_pruning(model, data, steps=5, sparsity_warmup=2500, ablation="zero", progress=False)


def test_a_config_object_is_a_whole_run_and_refuses_extra_settings(reverse):
    model, data = reverse
    config = EdgePruningConfig.reference(steps=3, ablation="zero", progress=False)
    result = tep.edge_pruning(model, data, config=config)
    assert result.config is config and result.config.sparsity_from == "sampled"
    with pytest.raises(tep.EdgePruneError, match="pass either config= or settings.*steps"):
        tep.edge_pruning(model, data, config=config, steps=5)
    with pytest.raises(tep.EdgePruneError, match="config must be an EdgePruningConfig"):
        tep.edge_pruning(model, data, config={"steps": 3})


def test_a_small_cpu_model_runs_on_one_thread_and_the_process_setting_is_restored(reverse):
    import torch

    from tl_edgeprune.threads import SMALL_MODEL_PARAMETERS, chosen_threads

    model, data = reverse
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = tep.edge_pruning(model, data, 0.9, steps=2, ablation="zero", progress=False)
        assert result.info["threads"] == 1 and torch.get_num_threads() == 2
        result = tep.edge_pruning(model, data, 0.9, steps=2, ablation="zero", progress=False, threads=2)
        assert result.info["threads"] == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    big = torch.nn.Linear(SMALL_MODEL_PARAMETERS, 1, bias=False)  # 40 MB on the CPU: over the line
    assert chosen_threads(model, None) == 1 and chosen_threads(big, None) is None and chosen_threads(big, 3) == 3
    with pytest.raises(tep.EdgePruneError, match="threads must be at least 1"):
        tep.eap(model, data, ablation="zero", progress=False, threads=0)


def test_results_print_short_and_name_typos_are_our_errors(reverse):
    model, data = reverse
    assert repr(data) == "ShardedData(363 examples in 5 shards of 2–6 positions)"
    assert repr(data.shards[0]) == "PairedData(3 examples × 2 positions, 3 scored positions)"
    scores = tep.eap(model, data, ablation="zero", progress=False)
    assert repr(scores).startswith("EdgeScores(eap: 94 edges, max |score|") and len(repr(scores)) < 120
    result = tep.edge_pruning(model, data, 0.9, steps=2, ablation="zero", progress=False)
    assert repr(result).startswith("EdgePruningResult(2 of 2 steps, target 0.9") and len(repr(result)) < 150
    with pytest.raises(tep.EdgePruneError, match=r"no reader 'a3.h0<x>' \(did you mean 'a3.h0<v>'\?\)"):
        scores.graph.edge_index("tok->a3.h0<x>")
    with pytest.raises(KeyError):  # still a KeyError for code that catches those
        tep.edge_mask_from_names(scores.graph, ["a0.h0->a9.h0<q>"])
    with pytest.raises(tep.EdgePruneError, match="positions as a tensor of indices must be integers"):
        import torch

        tep.paired_data(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                        positions=torch.tensor([1.0, 2.0]))
