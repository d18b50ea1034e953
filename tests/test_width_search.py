"""FASP-plus's searched widths on tiny models: every candidate keeps the requested size (counted on the stitched
weights), the fitness is the KL an independent forward pass gives, a layer that matters more stays wider, and the
search reads calibration windows only."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_family

import pruning
from pruning import width_search
from pruning.api import ResidentBlocks
from pruning.arch import get_adapter
from pruning.budget import Alignment, prunable_params
from pruning.methods import get_method

SEARCH = dict(widths="search", generations=3, offspring=4, selection_tokens="64/128")


def _search(model, calibration, sparsity, tmp_path, round_to=1):
    adapter = get_adapter(model.config)
    model = adapter.to_project(model)
    pruner = get_method("fasp-plus", **SEARCH)
    cpu = torch.device("cpu")
    search = width_search.WidthSearch(model, adapter, pruner, ResidentBlocks(cpu, cpu), calibration, sparsity,
                                      Alignment(round_to), batch_size=4, storage=cpu, progress=False, folder=tmp_path)
    plan, record = search.run(pruner.generations, pruner.offspring, pruner.selection_tokens, "test")
    return search, adapter, plan, record


def _aligned_unit(adapter, layer, round_to):
    """The most parameters one aligned step of any coupling of `layer` removes."""
    steps = []
    for c in adapter.couplings(layer, "channel"):
        allowed = Alignment(round_to).removals(c, adapter.head_dim, adapter.groups)
        steps.append(max(b - a for a, b in zip(allowed, allowed[1:])) * c.unit_cost(layer))
    return max(steps)


@pytest.mark.parametrize("round_to", [1, 16])
def test_every_candidate_and_the_result_remove_the_requested_size(calibration, tmp_path, round_to):
    sparsity = 0.3
    search, adapter, plan, record = _search(tiny_family("llama"), calibration, sparsity, tmp_path / "db", round_to)
    layers = adapter.layers(search.model)
    before = prunable_params(adapter, layers)
    tolerance = sum(_aligned_unit(adapter, layer, round_to) for layer in layers)
    assert len(search.evaluated) == record["evaluations"] > 2 + record["generations"]
    for levels in dict.fromkeys(search.evaluated):
        removed = before - prunable_params(adapter, adapter.layers(search.stitch(levels)))
        assert abs(removed - sparsity * before) <= tolerance, (levels, removed, sparsity * before)
    result = pruning.prune(tiny_family("llama"), "fasp-plus", sparsity, calibration, progress=False,
                           round_to=round_to, **SEARCH)
    after = prunable_params(adapter, adapter.layers(result.model))
    assert abs((before - after) - sparsity * before) <= tolerance
    assert all(w % round_to == 0 or w == 384 for w in result.metadata["layers"]["ffn_widths"])


def test_fitness_is_the_kl_of_an_independent_forward_pass(calibration, tmp_path):
    search, adapter, plan, record = _search(tiny_family("llama"), calibration, 0.3, tmp_path)
    windows = 3
    tokens = calibration[:windows]
    with torch.no_grad():
        dense = search.model(tokens).logits.log_softmax(-1).flatten(0, 1)
        for levels in list(dict.fromkeys(search.evaluated))[:3]:
            stitched = search.stitch(levels)(tokens).logits.log_softmax(-1).flatten(0, 1)
            expected = F.kl_div(stitched, dense, log_target=True, reduction="batchmean").item()
            assert search.fitness([levels], windows)[0] == pytest.approx(expected, rel=1e-4, abs=1e-7)
            later = search.stitch(levels)(calibration[1:windows]).logits.log_softmax(-1).flatten(0, 1)
            expected = F.kl_div(later, dense[tokens.shape[1]:], log_target=True, reduction="batchmean").item()
            assert search.fitness([levels], windows, first=1)[0] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    # the search combines each selection step's new windows with the last step's: its best KL is the parent's
    # fitness over all of the last step's windows, computed afresh here
    last = record["selection_tokens"][-1] // calibration.shape[1]
    assert record["best_kl"] == pytest.approx(search.fitness([search.levels.from_plan(plan)], last)[0], rel=1e-4)
    assert record["best_kl"] <= min(record["start_kl"].values())
    assert [g["best_kl"] for g in record["trace"]] == sorted((g["best_kl"] for g in record["trace"]), reverse=True)


def _kl_to(dense, pruned, tokens) -> float:
    with torch.no_grad():
        p = dense(tokens).logits.log_softmax(-1).flatten(0, 1)
        q = pruned(tokens).logits.log_softmax(-1).flatten(0, 1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean").item()


def test_a_layer_that_matters_more_stays_wider_and_the_kl_is_lower_than_uniform(calibration, probe):
    def model():
        m = tiny_family("llama", seed=3)
        with torch.no_grad():
            m.model.layers[1].mlp.down_proj.weight.mul_(100)
        return m

    searched = pruning.prune(model(), "fasp-plus", 0.3, calibration, progress=False, **SEARCH)
    uniform = pruning.prune(model(), "fasp-plus", 0.3, calibration, progress=False, widths="uniform")
    widths = {name: r.metadata["layers"]["ffn_widths"] for name, r in (("search", searched), ("uniform", uniform))}
    assert widths["search"][1] > widths["uniform"][1], widths
    assert _kl_to(model(), searched.model, probe) < _kl_to(model(), uniform.model, probe)
    record = searched.metadata["width_search"]
    assert record["trace"] and record["selection_tokens"] == [64, 128]


def test_the_search_reads_calibration_windows_only(tiny_model_dirs, data_root, tmp_path, cli, monkeypatch):
    from transformers import AutoTokenizer

    import fasp_bench.data

    def forbidden(*args, **kwargs):
        raise AssertionError("pruning read evaluation text")

    for name in ("perplexity_text", "wikitext2_test_text", "c4_eval_text", "calibration_validation_ids"):
        monkeypatch.setattr(fasp_bench.data, name, forbidden)
    received = []
    fitness = width_search.WidthSearch.fitness

    def spy(self, candidates, windows, first=0):
        received.append((first, self.calibration[first:windows].clone()))
        return fitness(self, candidates, windows, first)

    monkeypatch.setattr(width_search.WidthSearch, "fitness", spy)
    out = tmp_path / "ck"
    code, _, err = cli("prune", "--model", tiny_model_dirs["llama-gqa"], "--method",
                       "fasp-plus:widths=search,generations=2,offspring=2,selection_tokens=32/64",
                       "--sparsity", "0.2", "--nsamples", "4", "--seqlen", "32", "--out", out, data=data_root)
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama-gqa"])
    windows = fasp_bench.data.calibration_ids(tokenizer, 4, 32, 0, data_root)
    assert received and all(torch.equal(r, windows[first:first + len(r)]) for first, r in received)
    assert any(first > 0 for first, _ in received)  # later selection steps score only their new windows
    recorded = json.loads((out / "pruning.json").read_text())
    assert recorded["width_search"]["selection_tokens"] == [32, 64]
    assert recorded["method_options"]["widths"] == "search"


def test_the_store_keeps_the_search_record_and_the_report_renders_it(tiny_model_dirs, data_root, tmp_path, cli):
    # generations=0: the search only picks the better start plan (README)
    method = "fasp-plus:widths=search,generations=0,selection_tokens=32/64"
    code, _, err = cli("run", "--model", tiny_model_dirs["llama-gqa"], "--methods", method, "--sparsities", "0.2",
                       "--profile", "minimal", "--nsamples", "4", "--no-serve", "--ppl", "none", "--zeroshot", "none",
                       "--dtype", "float32", "--device", "cpu", "--work-dir", tmp_path / "w", "--out", tmp_path / "r",
                       data=data_root)
    assert code == 0, err
    (checkpoint,) = (tmp_path / "w" / "checkpoints").iterdir()
    recorded = json.loads((checkpoint / "pruning.json").read_text())["width_search"]
    store = tmp_path / "w" / "results.jsonl"
    (prune,) = [r for r in map(json.loads, store.read_text().splitlines()) if r["metric"] == "prune"]
    assert prune["result"]["width_search"] == recorded
    # rebuilt from the store alone, with the checkpoint gone, the page still gives the start plans' KL
    shutil.rmtree(checkpoint)
    code, _, err = cli("report", "--results", store, "--out", tmp_path / "rebuilt")
    assert code == 0, err
    section = (tmp_path / "rebuilt" / "README.md").read_text().split("## Width search")[1].split("## ")[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| {prune['model']} "))
    for kl in (recorded["start_kl"]["uniform"], recorded["start_kl"]["adaptive"], recorded["best_kl"]):
        assert f" {kl:.4g} " in row
    assert f" {recorded['start']} " in row and recorded["trace"] == []
    assert recorded["best_kl"] == recorded["start_kl"][recorded["start"]] == min(recorded["start_kl"].values())
