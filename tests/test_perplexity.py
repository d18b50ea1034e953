"""Perplexity agrees with a straightforward independent implementation."""

import gzip
import json
import math

import pytest
import torch

from fasp_bench.data import (
    CALIBRATION_DOCS,
    HELDOUT_DOCS,
    perplexity_dataset,
    perplexity_text,
    wikitext2_test_text,
)
from fasp_bench.perplexity import perplexity


@torch.no_grad()
def reference_perplexity(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """One window at a time, the model's own mean loss per window; equal windows -> mean of means."""
    losses = [model(input_ids=ids[:, i * seqlen:(i + 1) * seqlen],
                    labels=ids[:, i * seqlen:(i + 1) * seqlen]).loss.item() for i in range(windows)]
    return math.exp(sum(losses) / len(losses))


def test_matches_independent_implementation_on_a_tiny_model(tiny_model):
    ids = torch.randint(0, 300, (1, 7 * 32 + 5), generator=torch.Generator().manual_seed(0))
    result = perplexity(tiny_model, ids, seqlen=32, batch_size=3, progress=False)
    assert result["windows"] == 7 and result["predicted_tokens"] == 7 * 31
    assert result["ppl"] == pytest.approx(reference_perplexity(tiny_model, ids, 32, 7), rel=1e-4)
    capped = perplexity(tiny_model, ids, seqlen=32, max_windows=2, progress=False)
    assert capped["windows"] == 2
    assert capped["ppl"] == pytest.approx(reference_perplexity(tiny_model, ids, 32, 2), rel=1e-4)


def test_c4_heldout_is_documents_500_to_999(data_root):
    """The offline C4 perplexity text, as the evaluation builds it, against the shipped shard read by hand:
    documents 500-999 in file order joined with a space (SparseGPT's join), and no calibration document."""
    with gzip.open(data_root / "c4" / "c4-train.00000-of-01024.first1000.jsonl.gz", "rt", encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for line in lines]
    assert len(texts) == 1000
    text = perplexity_text("c4", data_root)
    assert text == " ".join(texts[500:1000])
    assert text.startswith(texts[500]) and text.endswith(texts[999])
    calibration = texts[:500]
    assert not [i for i, doc in enumerate(calibration) if doc in text]
    assert perplexity_dataset("c4", data_root) == "c4-heldout"
    assert perplexity_dataset("c4", None) == "c4-validation"
    assert (CALIBRATION_DOCS.start, CALIBRATION_DOCS.stop, HELDOUT_DOCS.start, HELDOUT_DOCS.stop) == (0, 500, 500, 1000)


@pytest.mark.real_model
def test_matches_independent_implementation_on_smollm2(data_root):
    from fasp_bench.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    ids = tokenizer(wikitext2_test_text(data_root)[:60_000], return_tensors="pt").input_ids
    result = perplexity(model, ids, seqlen=512, max_windows=4, batch_size=2, progress=False)
    assert result["windows"] == 4
    assert result["ppl"] == pytest.approx(reference_perplexity(model, ids, 512, 4), rel=1e-3)


def test_a_bos_model_gets_bos_first_in_every_window(tiny_model):
    """Each window is <bos> + seqlen - 1 text tokens; the reference builds those windows by hand."""
    text = torch.randint(3, 300, (1, 5 * 31 + 4), generator=torch.Generator().manual_seed(0))
    result = perplexity(tiny_model, text, seqlen=32, batch_size=2, progress=False, bos=2)
    windows = torch.cat([torch.full((5, 1), 2), text[0, : 5 * 31].view(5, 31)], dim=1).reshape(1, -1)
    assert result["windows"] == 5 and result["bos"] and result["predicted_tokens"] == 5 * 31
    assert result["ppl"] == pytest.approx(reference_perplexity(tiny_model, windows, 32, 5), rel=1e-4)


def test_calibration_side_validation_windows_avoid_every_calibration_window(data_root):
    """c4-calval: windows of the calibration documents that share no 64-token run with any calibration draw of
    up to 128 windows (a draw of n is the first n of a larger one), and no document of the test set c4-heldout."""
    from transformers import AutoTokenizer

    from fasp_bench.data import calibration_ids, perplexity_ids
    from fasp_bench.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    seqlen = 512
    draw = calibration_ids(tokenizer, 128, seqlen, root=data_root)
    assert torch.equal(calibration_ids(tokenizer, 16, seqlen, root=data_root), draw[:16])
    ids = perplexity_ids("c4-calval", tokenizer, seqlen, data_root)
    windows = ids.view(-1, seqlen)  # no BOS for SmolLM2: whole windows of text tokens
    assert len(windows) >= 100

    def runs(rows) -> set[int]:
        return {hash(tuple(row[i:i + 64])) for row in (r.tolist() for r in rows) for i in range(len(row) - 63)}

    validation = runs(windows)
    assert not validation & runs(draw)
    assert not validation & runs(tokenizer(perplexity_text("c4", data_root)[:200_000], return_tensors="pt").input_ids)


def test_perplexity_ids_are_reused_only_for_the_same_tokenizer_files(tmp_path, data_root):
    """A run tokenizes each test text once for all its checkpoints (they carry the dense model's tokenizer); a
    tokenizer whose files differ must get its own tokenization, not the cached one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from fasp_bench.data import perplexity_ids, perplexity_text

    def trained(corpus: str, vocab: int) -> PreTrainedTokenizerFast:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator([corpus] * 10, trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")

    text = perplexity_text("wikitext2", data_root)
    trained("the quick brown fox jumps over the lazy dog", 300).save_pretrained(tmp_path / "dense")
    trained("the quick brown fox jumps over the lazy dog", 300).save_pretrained(tmp_path / "pruned")  # same files
    trained("an entirely different corpus of words = , .", 400).save_pretrained(tmp_path / "other")
    ids = {}
    for name in ("dense", "pruned", "other"):
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / name)
        ids[name] = perplexity_ids("wikitext2", tokenizer, 64, data_root)
        expected = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids  # the oracle
        assert torch.equal(ids[name], expected), name
    assert not torch.equal(ids["other"][:, :1000], ids["dense"][:, :1000])
