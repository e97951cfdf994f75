"""The sentencepiece model the trainer loads: special ids, round trips, determinism."""
from __future__ import annotations

import pytest
import sentencepiece as spm

from data_prep import PrepError
from data_prep.sources.fashion_mnist import CLASSNAMES, TEMPLATES
from data_prep.tokenizer import train_tokenizer


def test_special_ids_and_round_trip(small_build):
    sp = spm.SentencePieceProcessor(model_file=str(small_build.tokenizer_path))
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    caption = TEMPLATES[1].format(CLASSNAMES[9])
    ids = sp.encode(caption)
    assert ids and min(ids) > 3 and sp.decode(ids) == caption
    assert sp.decode(sp.encode("A Black And White Photo")) == "a black and white photo"  # case folded
    assert (small_build.out_dir / "tokenizer.vocab").read_text().splitlines()[0] == "<pad>\t0"


def test_training_is_deterministic_and_reports_empty_corpus(tmp_path):
    captions = [t.format(c) for t in TEMPLATES for c in CLASSNAMES]
    a = train_tokenizer(captions, tmp_path / "a", vocab_size=100).read_bytes()
    b = train_tokenizer(reversed(captions), tmp_path / "b", vocab_size=100).read_bytes()
    assert a == b
    with pytest.raises(PrepError, match="no kept training captions"):
        train_tokenizer([], tmp_path / "c", vocab_size=100)
