"""The command line: bad input ends in one line on stderr, a non-zero exit and no output folder.

Bad input is checked in this process (`cli` fixture); one end-to-end `prune` runs as a real subprocess."""

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


def one_line_error(code, out, err, message):
    """What bad input must give: exit code 2, exactly one line on stderr naming the problem, no traceback."""
    assert code == 2, err
    assert err.startswith("fasp-bench: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err


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
def test_bad_input_one_line_error(cli, tiny_model_dirs, data_root, tmp_path, extra, message):
    out = tmp_path / "ck"
    code, stdout, stderr = cli(*_prune_args(tiny_model_dirs["opt"], out), *extra, data=data_root)
    one_line_error(code, stdout, stderr, message)
    assert stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_argparse_errors_exit_2_with_usage(cli, tiny_model_dirs, data_root, tmp_path, capsys):
    out = tmp_path / "ck"
    with pytest.raises(SystemExit) as exit_:
        cli(*_prune_args(tiny_model_dirs["opt"], out), "--dtype", "float8", data=data_root)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'float8'" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_missing_data_variable_target(cli, tiny_model_dirs, tmp_path):
    out = tmp_path / "ck"
    code, stdout, stderr = cli(*_prune_args(tiny_model_dirs["opt"], out), data=tmp_path / "nowhere")
    one_line_error(code, stdout, stderr, f"data directory {tmp_path / 'nowhere'} (from FASP_BENCH_DATA)")
    assert not out.exists()


def test_missing_data_file(cli, tiny_model_dirs, tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "ck"
    code, stdout, stderr = cli(*_prune_args(tiny_model_dirs["opt"], out), data=empty)
    one_line_error(code, stdout, stderr, f"missing data file {empty / 'c4'}")
    assert not out.exists()


def test_unsupported_architecture(cli, data_root, tmp_path):
    gpt2 = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(gpt2)
    out = tmp_path / "ck"
    code, stdout, stderr = cli(*_prune_args(gpt2, out), data=data_root)
    one_line_error(code, stdout, stderr, "unsupported architecture 'gpt2'")
    assert ", ".join(pruning.supported_model_types()) in stderr
    assert not out.exists()


def test_existing_output_refused_then_overwritten(cli, tiny_model_dirs, data_root, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stdout, stderr = cli(*_prune_args(tiny_model_dirs["opt"], out), data=data_root)
    one_line_error(code, stdout, stderr, "already exists")
    assert "--overwrite" in stderr
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, stderr = cli(*_prune_args(tiny_model_dirs["opt"], out, "--overwrite"), data=data_root)
    assert code == 0, stderr
    assert f"saved {out}" in stdout
    assert (out / "pruning.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
