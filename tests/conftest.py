"""Tiny random-init models for mechanics; the real SmolLM2 only in tests marked real_model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

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


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    return TINY_MODELS[request.param]()


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


def servable_configs() -> dict:
    """Tiny models whose head size (64) vLLM's CPU attention kernels support."""
    return {
        "llama": LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=384, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                             max_position_embeddings=256, tie_word_embeddings=True),
        "opt": OPTConfig(vocab_size=VOCAB, hidden_size=256, ffn_dim=384, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=256, dropout=0.0),
    }


@pytest.fixture(scope="session")
def servable_model_dirs(tmp_path_factory) -> dict[str, Path]:
    tokenizer = _tiny_tokenizer()
    dirs = {}
    for name, config in servable_configs().items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"servable-{name}")
        (LlamaForCausalLM if name == "llama" else OPTForCausalLM)(config).eval().save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs
