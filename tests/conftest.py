"""Tiny random-init models for mechanics; the real SmolLM2 only in tests marked real_model."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 300
REPO = Path(__file__).resolve().parents[1]


def tiny_llama(gqa: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2 if gqa else 4, head_dim=16,
                         max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=64, dropout=0.0)
    return OPTForCausalLM(config).eval()


TINY_MODELS = {"llama": lambda: tiny_llama(gqa=False), "llama-gqa": tiny_llama, "opt": tiny_opt}


def family_configs() -> dict[str, PretrainedConfig]:
    """One tiny config per registered family, with head size 64 (vLLM's CPU attention kernels refuse 16) and
    each family's own traits: Llama-3 rope scaling, Mistral's sliding window, Qwen2's q/k/v biases, Qwen3's
    q/k norms, Gemma-3's single KV head with sliding and global layers, OPT's multi-head attention."""
    common = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=256, tie_word_embeddings=True)
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return {
        "llama": LlamaConfig(**common, rope_parameters=llama3_rope),
        "mistral": MistralConfig(**common, sliding_window=16),
        "qwen2": Qwen2Config(**common),
        "qwen3": Qwen3Config(**common),
        "gemma3": Gemma3TextConfig(**{**common, "num_key_value_heads": 1}, sliding_window=8, query_pre_attn_scalar=64,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        "opt": OPTConfig(vocab_size=VOCAB, hidden_size=256, ffn_dim=384, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=256, dropout=0.0),
    }


def tiny_family(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_configs()[name]).eval()


@pytest.fixture(params=sorted(family_configs()))
def tiny_model(request):
    """A tiny random-init model of every registered family."""
    return tiny_family(request.param)


@pytest.fixture
def calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("FASP_BENCH_DATA") or REPO.parent / "shared" / "data")
    if not (root / "c4").is_dir():
        pytest.fail(f"evaluation data not found at {root}: set FASP_BENCH_DATA to the shared data folder")
    return root


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models with a byte-level tokenizer, for CLI tests."""
    tokenizer = _tiny_tokenizer()
    dirs = {}
    for name, make in TINY_MODELS.items():
        path = tmp_path_factory.mktemp(name)
        make().save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="session")
def servable_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models of every family (head size 64), with a byte-level tokenizer."""
    tokenizer = _tiny_tokenizer()
    dirs = {}
    for name in family_configs():
        path = tmp_path_factory.mktemp(f"servable-{name}")
        tiny_family(name).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture
def cli(capsys, monkeypatch):
    """`fasp-bench ARGS` in this process: returns (exit code, stdout, stderr). `data` sets FASP_BENCH_DATA.

    main() turns BenchError/PruningError into one line and exit code 2; argparse's own errors raise SystemExit.
    """
    from fasp_bench.cli import main

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own format

    def run(*args, data=None):
        if data is not None:
            monkeypatch.setenv("FASP_BENCH_DATA", str(data))
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
