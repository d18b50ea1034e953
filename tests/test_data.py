"""Offline data: the calibration pool and the held-out evaluation documents never overlap."""

import torch

from fasp_bench.data import CALIBRATION_DOCS, HELDOUT_DOCS, c4_documents, calibration_ids, wikitext2_test_text


def test_calibration_and_heldout_documents_are_disjoint(data_root):
    assert set(CALIBRATION_DOCS).isdisjoint(HELDOUT_DOCS)
    calibration, heldout = c4_documents(data_root, CALIBRATION_DOCS), c4_documents(data_root, HELDOUT_DOCS)
    assert len(calibration) == len(heldout) == 500
    assert calibration[0].startswith("Beginners BBQ Class Taking Place in Missoula!")
    assert not set(calibration) & set(heldout)


def test_calibration_windows_are_seeded_and_shaped(data_root, tiny_model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["opt"])
    first = calibration_ids(tokenizer, 6, 64, seed=0, root=data_root)
    assert first.shape == (6, 64) and first.dtype == torch.long
    assert torch.equal(first, calibration_ids(tokenizer, 6, 64, seed=0, root=data_root))
    assert not torch.equal(first, calibration_ids(tokenizer, 6, 64, seed=1, root=data_root))


def test_wikitext2_join_matches_the_hub_text(data_root):
    text = wikitext2_test_text(data_root)
    assert len(text) == 1_294_336  # ../shared/data/README.md: the "\n\n"-joined hub rows
    assert len(text.encode("utf-8")) == 1_296_370


def test_bos_convention_follows_the_tokenizer(data_root, tiny_model_dirs, tmp_path):
    """A tokenizer that starts sequences with BOS gets it first in every calibration window; one that does
    not (SmolLM2's, the tiny one) gets plain windows."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from fasp_bench.data import bos_id

    plain = AutoTokenizer.from_pretrained(tiny_model_dirs["opt"])
    assert bos_id(plain) is None
    with_bos = AutoTokenizer.from_pretrained(tiny_model_dirs["opt"], bos_token="<unk>")
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<unk> $A", special_tokens=[("<unk>", with_bos.convert_tokens_to_ids("<unk>"))])
    bos = with_bos.bos_token_id
    assert bos_id(with_bos) == bos
    windows = calibration_ids(with_bos, 4, 16, seed=0, root=data_root)
    assert windows.shape == (4, 16) and (windows[:, 0] == bos).all() and not (windows[:, 1:] == bos).any()
    assert not (calibration_ids(plain, 4, 16, seed=0, root=data_root)[:, 0] == bos).all()
