"""Sentencepiece tokenizer with the ids the text tower expects: pad=0, unk=1, bos=2, eos=3."""
from __future__ import annotations

import os
from typing import Optional

import sentencepiece as spm
import torch

from data_prep import storage
from data_prep.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID  # the builder owns the id contract


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike, context_length: int, model_bytes: Optional[bytes] = None) -> None:
        """``model_path``: a local path or any location :mod:`data_prep.storage` reads (s3://...)."""
        self.model_path = str(model_path)
        self.context_length = context_length
        if model_bytes is None:
            try:
                model_bytes = storage.read_bytes(str(model_path))
            except OSError as e:
                raise FileNotFoundError(
                    f"tokenizer model not readable: {storage.redact(model_path)} ({e.strerror or e}); build the dataset "
                    "with `python -m data_prep build`, which trains it, or set data.tokenizer=PATH"
                ) from e
        self.model_bytes = model_bytes  # read once: workers and checkpoints get these bytes, not the path
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"tokenizer {storage.redact(model_path)} has special ids (pad, unk, bos, eos)={ids}; "
                             "expected (0, 1, 2, 3)")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """texts -> ids (N, context_length): bos, pieces (truncated), eos, then pad."""
        L = self.context_length
        out = torch.full((len(texts), L), PAD_ID, dtype=torch.long)
        for i, pieces in enumerate(self._sp.encode(list(texts))):
            row = [BOS_ID, *pieces[: L - 2], EOS_ID]  # eos always kept: the text tower pools there
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) > EOS_ID])

    # DataLoader workers receive the tokenizer by pickle: rebuild the processor from its bytes
    # (no read of a remote store per worker).
    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "context_length": self.context_length, "model_bytes": self.model_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"], state["context_length"], state["model_bytes"])
