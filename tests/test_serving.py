"""vLLM serving: project architectures load through the plugin and generate what transformers generates."""

import json
import math
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is installed by tox (python -m fasp_bench.serving.install)")

from conftest import family_configs  # noqa: E402

from fasp_bench.serving.bench import ServeProtocol, measure_in_subprocess, ppl_gap, serve_models  # noqa: E402
from fasp_bench.serving.measure import prompt_token_ids  # noqa: E402
from fasp_bench.store import ResultsStore  # noqa: E402

PROTOCOL = ServeProtocol(prompts=3, input_len=16, output_len=8, repeats=1, dtype="float32")


NON_STOCK = [*(f"{family}-fasp" for family in family_configs()), "llama-flap", "opt-flap", "llama-noheads"]


@pytest.fixture(scope="module")
def served_checkpoints(tmp_path_factory, servable_model_dirs, data_root):
    """Every family pruned to non-stock shapes (FASP: narrow V; FLAP: per-layer widths, head counts, added
    biases; a layer with no heads left) and to stock shapes (Wanda-SP below one head's share)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pruning
    from fasp_bench.data import calibration_ids
    from pruning.surgery import cut

    root = tmp_path_factory.mktemp("served")
    for family, dense in servable_model_dirs.items():
        tokenizer = AutoTokenizer.from_pretrained(dense)
        calibration = calibration_ids(tokenizer, 4, 32, root=data_root)
        for method, sparsity in (("fasp", 0.3), ("flap", 0.3), ("wanda-sp", 0.1)):
            if method == "flap" and family not in ("llama", "opt"):
                continue
            result = pruning.prune(AutoModelForCausalLM.from_pretrained(dense), method=method, sparsity=sparsity,
                                   calibration=calibration, progress=False)
            pruning.save_pruned(result.model, root / f"{family}-{method}", result.metadata, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(servable_model_dirs["llama"])
    adapter = pruning.get_adapter(model.config)
    model = adapter.to_project(model)
    layer = adapter.layers(model)[1]
    heads = next(c for c in adapter.couplings(layer, "head") if c.name == "attn")
    cut(layer, heads, torch.zeros(0, dtype=torch.long), consumer_bias=torch.linspace(-0.5, 0.5, 256))
    pruning.save_pruned(adapter.finalize(model), root / "llama-noheads", {}, tokenizer=tokenizer)
    return root


def transformers_greedy(path: Path, protocol: ServeProtocol) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pruning  # noqa: F401
    from fasp_bench.data import bos_id

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    bos = bos_id(AutoTokenizer.from_pretrained(path))
    tokens = []
    with torch.no_grad():
        for ids in prompt_token_ids(model.config.vocab_size, protocol.prompts, protocol.input_len, protocol.seed, bos):
            x = torch.tensor([ids])
            for _ in range(protocol.output_len):
                x = torch.cat([x, model(x).logits[:, -1:].argmax(-1)], dim=1)
            tokens.append(x[0, protocol.input_len:].tolist())
    return tokens


@pytest.mark.parametrize("checkpoint", NON_STOCK)
def test_project_architecture_matches_transformers_greedy(served_checkpoints, checkpoint):
    path = served_checkpoints / checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"][0].startswith("Pruned") and config["model_type"].startswith("pruned_")
    if checkpoint.endswith("fasp"):
        assert config["v_head_dims"][0] < config["head_dim" if "head_dim" in config else "hidden_size"]
    elif checkpoint.endswith("flap"):
        assert len(set(config["ffn_widths"])) > 1 and config["ffn_output_bias"]
    else:
        assert config["kv_heads"][1] == 0 and config["attn_output_bias"]
    windows = _ppl_windows(config["vocab_size"])
    result = measure_in_subprocess(str(path), PROTOCOL, timeout_s=400, return_tokens=True, ppl={"w": windows})
    assert "error" not in result, result["error"]
    assert result["architecture"] == config["architectures"][0]
    assert result["tokens"] == transformers_greedy(path, PROTOCOL)
    for key in ("output_tok_s", "total_tok_s", "ttft_s", "kv_cache_tokens", "peak_rss_bytes"):
        assert result[key] > 0, key
    # the engine's perplexity on the same windows (prompt logprobs) is transformers', within float32's tolerance
    engine = math.exp(sum(result["ppl"]["w"]) / len(windows))
    gap, agrees = ppl_gap(engine, transformers_ppl(path, windows), "float32")
    assert agrees, f"vLLM perplexity {engine:.4f} is {gap:+.3%} from transformers'"


def _ppl_windows(vocab_size: int, count: int = 6, seqlen: int = 48) -> list[list[int]]:
    return torch.randint(3, vocab_size, (count, seqlen), generator=torch.Generator().manual_seed(5)).tolist()


def transformers_ppl(path: Path, windows: list[list[int]]) -> float:
    from transformers import AutoModelForCausalLM

    from fasp_bench.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(windows)
    return perplexity(model, ids, ids.shape[1], progress=False)["ppl"]


def test_a_checkpoint_served_differently_from_the_one_evaluated_is_caught(served_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    path, corrupted = served_checkpoints / "llama-fasp", tmp_path / "corrupted"
    shutil.copytree(path, corrupted)
    weights = load_file(corrupted / "model.safetensors")
    name = next(n for n in weights if n.endswith("layers.1.mlp.down_proj.weight"))
    weights[name] = weights[name] * 3  # one weight matrix scaled
    save_file(weights, corrupted / "model.safetensors", metadata={"format": "pt"})
    windows = _ppl_windows(json.loads((path / "config.json").read_text())["vocab_size"])
    result = measure_in_subprocess(str(corrupted), PROTOCOL, timeout_s=400, ppl={"w": windows})
    engine = math.exp(sum(result["ppl"]["w"]) / len(windows))
    assert ppl_gap(engine, transformers_ppl(corrupted, windows), "float32")[1]  # it serves what it holds
    assert not ppl_gap(engine, transformers_ppl(path, windows), "float32")[1]  # not what was evaluated


@pytest.mark.parametrize("family, method", [("llama", "fasp"), ("gemma3", "fasp"), ("qwen2", "flap")])
def test_tensor_parallel_2_matches_transformers_greedy(servable_model_dirs, data_root, tmp_path, family, method):
    """vLLM's CPU backend runs TP=2 on this machine's two cores (one rank each). Narrow V split per rank;
    Gemma-3's one KV head replicated on both ranks; FLAP's per-layer widths and KV-head counts with
    --tp-multiple 2 and its added output biases (reduced once, not once per rank)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pruning
    from fasp_bench.data import calibration_ids

    dense = servable_model_dirs[family]
    tokenizer = AutoTokenizer.from_pretrained(dense)
    result = pruning.prune(AutoModelForCausalLM.from_pretrained(dense), method=method, sparsity=0.3,
                           calibration=calibration_ids(tokenizer, 4, 32, root=data_root), tp_multiple=2,
                           progress=False)
    pruning.save_pruned(result.model, tmp_path / "ck", result.metadata, tokenizer=tokenizer)
    protocol = ServeProtocol(**{**asdict(PROTOCOL), "tensor_parallel_size": 2})
    served = measure_in_subprocess(str(tmp_path / "ck"), protocol, timeout_s=400, return_tokens=True)
    assert "error" not in served, served["error"]
    assert served["architecture"].startswith("Pruned")
    assert served["tokens"] == transformers_greedy(tmp_path / "ck", protocol)


def test_both_engines_serve_the_plugin_like_transformers(served_checkpoints):
    """The CPU default runs vLLM's engine in this process; vLLM's own layout (engine core and worker in their
    processes, one core kept back) must give the same greedy tokens."""
    path = served_checkpoints / "llama-fasp"
    for engine in ("in-process", "separate"):
        result = measure_in_subprocess(str(path), replace(PROTOCOL, engine=engine), timeout_s=400, return_tokens=True)
        assert "error" not in result, f"{engine}: {result['error']}"
        assert result["tokens"] == transformers_greedy(path, PROTOCOL), engine


def test_in_process_engine_with_tensor_parallelism_is_refused(served_checkpoints, cli, tmp_path):
    code, out, err = cli("serve", served_checkpoints / "llama-fasp", "--engine", "in-process",
                         "--tensor-parallel-size", "2", "--run-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "--engine separate" in err
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.parametrize("family", sorted(family_configs()))
def test_stock_shape_checkpoint_serves_without_the_plugin(served_checkpoints, family, monkeypatch):
    path = served_checkpoints / f"{family}-wanda-sp"
    config = json.loads((path / "config.json").read_text())
    assert not config["architectures"][0].startswith("Pruned")
    monkeypatch.setenv("VLLM_PLUGINS", "no-plugin")  # vLLM loads only the plugins named here: none
    result = measure_in_subprocess(str(path), PROTOCOL, timeout_s=400, return_tokens=True)
    assert "error" not in result, result["error"]
    assert result["tokens"] == transformers_greedy(path, PROTOCOL)


def test_broken_checkpoints_are_recorded_errors_and_the_run_goes_on(served_checkpoints, tmp_path):
    truncated, mismatched = tmp_path / "truncated", tmp_path / "mismatched"
    for target in (truncated, mismatched):
        shutil.copytree(served_checkpoints / "llama-wanda-sp", target)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    config = json.loads((mismatched / "config.json").read_text())
    config["intermediate_size"] = 999  # the weights say otherwise: vLLM's loader fails in its worker
    (mismatched / "config.json").write_text(json.dumps(config))

    store = ResultsStore(tmp_path / "results.jsonl")
    rows = serve_models([str(truncated), str(mismatched)], store, PROTOCOL, timeout_s=400)
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert "cannot read" in rows[0]["error"] and "is the checkpoint complete" in rows[0]["error"]
    assert "\n" not in rows[1]["error"] and rows[1]["error"], rows[1]
    assert len(store.records()) == 2 and all("error" in r["result"] for r in store.records())
    assert os.path.getsize(store.path) > 0


def test_sweep_points_are_stored_with_their_bounds_and_reused(served_checkpoints, servable_model_dirs, cli,
                                                              tmp_path, monkeypatch):
    import fasp_bench.serving.bench as bench

    dense, fasp = str(servable_model_dirs["llama"]), str(served_checkpoints / "llama-fasp")
    args = ["serve", fasp, "--dense", dense, "--prompts", 3, "--input-len", 16, "--output-len", 8, "--repeats", 1,
            "--dtype", "float32", "--run-dir", tmp_path, "--sweep", "1x16x8", "2x32x1"]  # one more batch, a prefill
    code, out, err = cli(*args)
    assert code == 0, err
    store = ResultsStore(tmp_path / "results.jsonl")
    records = store.records()
    assert len(records) == 6 and all("error" not in r["result"] for r in records)
    by_point = {(r["model"], r["protocol"]["prompts"], r["protocol"]["output_len"]): r["result"] for r in records}
    prefill = by_point[(fasp, 2, 1)]
    assert prefill["roofline"]["kind"] == "prefill" and len(prefill["prompt_tok_s_runs"]) == 1
    assert prefill["generated_tokens"] == 2  # one token per prompt
    for prompts, output_len in ((3, 8), (1, 8), (2, 1)):  # pruned: fewer bytes per step and fewer FLOPs
        assert by_point[(fasp, prompts, output_len)]["roofline"]["bound"] < by_point[
            (dense, prompts, output_len)]["roofline"]["bound"]
    assert "prefill, batch 2, 32 in / 1 out" in out and "Share of limit" in out

    def no_measuring(*args, **kwargs):
        raise AssertionError("a stored point was measured again")

    monkeypatch.setattr(bench, "measure_in_subprocess", no_measuring)
    assert cli(*args)[0] == 0 and len(store.records()) == 6

    # --remeasure measures every point again in one engine per model, and the new records are the ones read
    asked = []

    def fresh_measuring(path, protocol, timeout_s, points, ppl):
        asked.append((path, [(p.prompts, p.input_len, p.output_len) for p in points]))
        # the dense engine's repeats shared the machine with another program: the run says so, naming it
        other = 0.5 if path == dense else 0.02
        return {"points": [{"output_tok_s": 1.0, "output_tok_s_runs": [1.0], "other_cpu": other} for _ in points]}

    monkeypatch.setattr(bench, "measure_in_subprocess", fresh_measuring)
    code, _, err = cli(*args, "--remeasure")
    assert code == 0
    warnings = [line for line in err.splitlines() if "other programs kept" in line]
    assert len(warnings) == 3 and all("50%" in line and dense in line for line in warnings)
    assert [path for path, _ in asked] == [dense, fasp]
    assert all(sorted(points) == [(1, 16, 8), (2, 32, 1), (3, 16, 8)] for _, points in asked)
    assert len(ResultsStore(store.path).records()) == 6  # superseded, keyed as before
    assert all(r["result"]["output_tok_s"] == 1.0 for r in ResultsStore(store.path).records())
    assert len(store.path.read_text().splitlines()) == 12  # the old lines stay in the file


@pytest.mark.parametrize("point", ["8x64", "0x64x256", "8x64x256x1"])
def test_a_malformed_sweep_point_is_refused_before_any_engine(served_checkpoints, cli, tmp_path, point):
    code, _, err = cli("serve", served_checkpoints / "llama-fasp", "--run-dir", tmp_path, "--sweep", point)
    assert code == 2 and err.count("\n") == 1 and "BATCHxINxOUT" in err
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.real_model
@pytest.mark.parametrize("name, architecture", [("smollm2-135m", "PrunedLlamaForCausalLM"),
                                                ("gemma3-270m", "PrunedGemma3ForCausalLM")])
def test_pruned_real_model_serves_like_transformers(tmp_path, data_root, name, architecture):
    """FASP 20% (narrow V); Gemma-3: one KV head, sliding and global layers, BOS-first prompts."""
    import pruning
    from fasp_bench.data import bos_id, calibration_ids
    from fasp_bench.models import load_model

    model, tokenizer = load_model(name)
    result = pruning.prune(model, method="fasp", sparsity=0.2, calibration=calibration_ids(tokenizer, 4, 128,
                                                                                             root=data_root))
    pruning.save_pruned(result.model, tmp_path / "fasp", result.metadata, tokenizer=tokenizer)
    protocol = ServeProtocol(prompts=4, input_len=32, output_len=16, repeats=1, dtype="float32")
    served = measure_in_subprocess(str(tmp_path / "fasp"), protocol, timeout_s=600, return_tokens=True)
    assert "error" not in served, served["error"]
    assert served["architecture"] == architecture and served["bos"] == (bos_id(tokenizer) is not None)
    assert served["tokens"] == transformers_greedy(tmp_path / "fasp", protocol)


def test_other_cpu_counts_other_programs_and_not_the_measuring_tree():
    """The share of the CPUs that programs outside the measuring process's tree took during a window, against an
    independent count: the CPU time every other process accumulated over the same window (psutil per process).
    The measuring process spins too, and must not count; the other program is reparented away from this tree."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from fasp_bench.serving.measure import OtherCPU

    spin = "import time\nt = time.time()\nwhile time.time() - t < 30: pass"
    started = subprocess.run(["sh", "-c", f'{sys.executable} -c "{spin}" >/dev/null 2>&1 & echo $!'],
                             capture_output=True, text=True, check=True)
    other = int(started.stdout.strip())  # its shell exited: the spinner is no child of this process
    try:
        time.sleep(0.5)
        me = psutil.Process()
        assert other not in {p.pid for p in me.children(recursive=True)}
        ours = {me.pid} | {p.pid for p in me.children(recursive=True)}

        def others() -> dict[int, float]:
            times = {}
            for proc in psutil.process_iter():
                if proc.pid in ours:
                    continue
                try:
                    t = proc.cpu_times()
                    times[proc.pid] = t.user + t.system
                except psutil.Error:
                    continue
            return times

        window = OtherCPU()
        before, t0 = others(), time.perf_counter()
        window.start()
        while time.perf_counter() - t0 < 2.0:  # the measuring process busy the whole window
            pass
        share = window.share()
        after, wall = others(), time.perf_counter() - t0
        cpus = len(os.sched_getaffinity(0))
        oracle = sum(after[p] - before[p] for p in after.keys() & before.keys()) / (wall * cpus)
        spinner = (after[other] - before[other]) / (wall * cpus)
        assert spinner > 0.15  # it ran (a third of two cores even beside two more busy processes)
        assert share == pytest.approx(oracle, abs=0.08)
    finally:
        os.kill(other, signal.SIGKILL)


def _gqa_attention(query, key, value, heads: int, kv_heads: int):
    """Causal grouped-query attention over [tokens, heads * width] tensors; K and V widths may differ."""
    q, k, v = (t.unflatten(-1, (n, -1)).transpose(0, 1) for t, n in ((query, heads), (key, kv_heads),
                                                                    (value, kv_heads)))
    k, v = (t.repeat_interleave(heads // kv_heads, dim=0) for t in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).flatten(-2)


def test_native_v_attention_computes_what_narrow_v_attention_does():
    """The GPU path: V cut to the model's widest V (below the head size) before attending, the output padded
    back, o_proj keeping each head's own V width, equals attention over the layer's own narrow V."""
    from fasp_bench.serving.vllm_pruned import NarrowVAttention

    heads, kv_heads, hd, dv, widest, tokens = 4, 2, 16, 5, 9, 7
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(tokens, heads * hd, generator=g), torch.randn(tokens, kv_heads * hd, generator=g)
    v = torch.randn(tokens, kv_heads, dv, generator=g)
    padded = torch.nn.functional.pad(v, (0, hd - dv)).flatten(-2)  # as PaddedVQKVLinear hands it over
    calls = []

    def inner(query, key, value):
        calls.append(value.shape)
        return _gqa_attention(query, key, value, heads, kv_heads)

    out = NarrowVAttention(inner, hd, widest)(q, k, padded)
    assert calls == [torch.Size([tokens, kv_heads * widest])]  # the engine attends and caches at `widest`
    own = out.unflatten(-1, (heads, hd))[..., :dv].flatten(-2)  # what NarrowVRowLinear passes on
    torch.testing.assert_close(own, _gqa_attention(q, k, v.flatten(-2), heads, kv_heads))
    assert not out.unflatten(-1, (heads, hd))[..., widest:].any()


def test_native_v_width_is_the_widest_v_on_a_gpu_only(monkeypatch):
    from types import SimpleNamespace

    from fasp_bench.serving.vllm_pruned import native_v_width

    config = SimpleNamespace(hidden_size=64, num_attention_heads=4, head_dim=16,
                             v_head_dims=[9, 5, 16], kv_heads=[2, 2, 0])  # the 16 is a layer with no heads
    assert native_v_width(config, cuda=True) == 9
    assert native_v_width(config, cuda=False) is None  # vLLM's CPU attention: one width for K and V
    monkeypatch.setenv("FASP_BENCH_PAD_V", "1")
    assert native_v_width(config, cuda=True) is None
    monkeypatch.delenv("FASP_BENCH_PAD_V")
    config.v_head_dims = [9, 16, 16]
    config.kv_heads = [2, 2, 0]
    assert native_v_width(config, cuda=True) is None  # one layer keeps V whole: nothing to save
