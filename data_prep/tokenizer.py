"""Train the sentencepiece tokenizer the trainer uses, on the kept training captions.

The special ids are part of the contract with ``pretrain``: pad=0, unk=1, bos=2, eos=3. Training is
in memory (no stray files) and deterministic: fixed input order, one thread, a fixed seed.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from data_prep import PrepError
from data_prep.atomic import atomic_write

TOKENIZER_NAME = "tokenizer.model"
VOCAB_NAME = "tokenizer.vocab"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_tokenizer(
    captions: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    seed: int = 0,
) -> Path:
    """Write ``tokenizer.model`` and ``tokenizer.vocab`` (``piece<TAB>score`` lines) into ``out_dir``."""
    corpus = sorted(set(captions))  # each distinct caption once, in a fixed order
    if not corpus:
        raise PrepError("no kept training captions to train the tokenizer on: see report.md for what was filtered out")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # small corpora cannot fill vocab_size; take what they give
            normalization_rule_name="nmt_nfkc_cf",  # NFKC + case folding
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            character_coverage=1.0,
            input_sentence_size=0,  # use every sentence: no sampling
            shuffle_input_sentence=False,
            num_threads=1,  # thread scheduling would make EM sums, hence scores, order-dependent
            minloglevel=2,
        )
    except RuntimeError as e:
        raise PrepError(f"tokenizer training failed (tokenizer.vocab_size={vocab_size}, "
                        f"{len(corpus)} distinct captions): {e}") from e
    out_dir = Path(out_dir)
    path = out_dir / TOKENIZER_NAME
    with atomic_write(path, "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    with atomic_write(out_dir / VOCAB_NAME, "wb") as f:
        f.write(vocab.encode("utf-8"))
    return path
