"""The command line: bad input ends in one line on stderr, a non-zero exit and no output folder."""

import json
import subprocess
import sys

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

import pruning


def run_cli(*args, env_data=None, cwd=None):
    import os

    env = {**os.environ}
    if env_data is not None:
        env["FASP_BENCH_DATA"] = str(env_data)
    return subprocess.run([sys.executable, "-m", "fasp_bench.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def _prune_args(model_dir, out, *extra):
    return ("prune", "--model", model_dir, "--sparsity", "0.2", "--out", out, "--nsamples", "4", "--seqlen", "32",
            *extra)


def test_prune_tiny_model_end_to_end(tiny_model_dirs, data_root, tmp_path):
    out = tmp_path / "ck"
    done = run_cli(*_prune_args(tiny_model_dirs["llama-gqa"], out, "--device", "cpu", "--dtype", "bfloat16"),
                   env_data=data_root)
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "pruning.json").read_text())
    assert meta["method"] == "fasp" and meta["calibration"]["nsamples"] == 4
    assert (meta["device"], meta["dtype"]) == ("cpu", "bfloat16")
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert meta["fingerprint"]["sha256_20"] == pruning.checkpoint.content_fingerprint(out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--sparsity", "1.5"), "sparsity 1.5 is out of range"),
        (("--sparsity", "-0.1"), "out of range"),
        (("--method", "magic"), "unknown method 'magic'"),
        (("--data", "/nonexistent/data"), "data directory /nonexistent/data"),
        (("--device", "cuda:7"), "device cuda:7 requested but torch sees"),
        (("--nsamples", "0"), "--nsamples must be at least 1"),
    ],
)
def test_bad_input_one_line_error(tiny_model_dirs, data_root, tmp_path, extra, message):
    out = tmp_path / "ck"
    done = run_cli(*_prune_args(tiny_model_dirs["opt"], out), *extra, env_data=data_root)
    assert done.returncode != 0
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_data_variable_target(tiny_model_dirs, tmp_path):
    out = tmp_path / "ck"
    done = run_cli(*_prune_args(tiny_model_dirs["opt"], out), env_data=tmp_path / "nowhere")
    assert done.returncode != 0 and "FASP_BENCH_DATA" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_missing_data_file(tiny_model_dirs, tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "ck"
    done = run_cli(*_prune_args(tiny_model_dirs["opt"], out), env_data=empty)
    assert done.returncode != 0 and "missing data file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_unsupported_architecture(data_root, tmp_path):
    gpt2 = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(gpt2)
    out = tmp_path / "ck"
    done = run_cli(*_prune_args(gpt2, out), env_data=data_root)
    assert done.returncode != 0
    assert "unsupported architecture 'gpt2'" in done.stderr
    assert ", ".join(pruning.supported_model_types()) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_existing_output_refused_then_overwritten(tiny_model_dirs, data_root, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = run_cli(*_prune_args(tiny_model_dirs["opt"], out), env_data=data_root)
    assert done.returncode != 0 and "already exists" in done.stderr and "--overwrite" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"
    done = run_cli(*_prune_args(tiny_model_dirs["opt"], out, "--overwrite"), env_data=data_root)
    assert done.returncode == 0, done.stderr
    assert (out / "pruning.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
