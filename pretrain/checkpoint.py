"""Atomic, exactly-resumable checkpoints in DeepSpeed's own format.

Layout: ``<run_dir>/checkpoints/step_00000100/`` holds DeepSpeed's files for that tag, one
``rank_XXXXX.pt`` per rank (data position and RNG states: both differ between ranks) and
``COMPLETE``. Every rank writes into ``checkpoints/.incoming/<tag>``; after a barrier rank 0 writes
``COMPLETE`` and renames the folder into place. A crash mid-save leaves only ``.incoming``, which
the next save clears, so the newest complete checkpoint is never damaged. ``resume=auto`` takes
the highest step that has ``COMPLETE``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_prep.atomic import atomic_write

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
INCOMING = ".incoming"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """``auto`` -> newest complete checkpoint or None; ``none`` -> None; else that checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint (no {COMPLETE} file in it)")
    return path


class Checkpointer:
    def __init__(self, root: str | os.PathLike, keep: int, rank: int, world_size: int) -> None:
        self.root, self.keep, self.rank, self.world_size = Path(root), keep, rank, world_size

    def save(self, engine: Any, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
             files: Optional[dict[str, bytes]] = None) -> Path:
        """Collective: every rank calls it. ``files`` (name -> content, e.g. the resolved config and
        the tokenizer) are written by rank 0 so the folder is self-contained. Returns the folder."""
        tag = f"step_{step:08d}"
        incoming = self.root / INCOMING
        if self.rank == 0:
            shutil.rmtree(incoming / tag, ignore_errors=True)  # debris of a crashed save
        dist.barrier()
        engine.save_checkpoint(str(incoming), tag=tag, client_state=client_state, save_latest=False)
        with atomic_write(incoming / tag / f"rank_{self.rank:05d}.pt") as f:
            torch.save(rank_state, f)
        dist.barrier()  # every rank's files are written
        final = self.root / tag
        if self.rank == 0:
            for name, content in (files or {}).items():
                with atomic_write(incoming / tag / name) as f:
                    f.write(content)
            with atomic_write(incoming / tag / COMPLETE, "w") as f:
                json.dump({"step": step, "world_size": self.world_size}, f)
            if final.exists():  # a re-save of the same step: replace it
                shutil.rmtree(final)
            os.replace(incoming / tag, final)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore engine (weights, optimizer, schedule) in place; return (client, rank) states."""
        meta = json.loads((path / COMPLETE).read_text())
        if meta["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {self.world_size}: "
                "resume with the same number of ranks (export the weights to start a new run from them)"
            )
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        rank_state = torch.load(path / f"rank_{self.rank:05d}.pt", map_location="cpu", weights_only=False)
        return client_state, rank_state
