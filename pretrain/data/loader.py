"""The training loader of one rank: a DataLoader over :class:`ShardStream` plus its position.

Its ``state_dict`` holds, per consumer slot, the cursor of the last batch the TRAINING LOOP took
(not of batches prefetched by workers), so a checkpoint records exactly what was consumed.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader

from data_prep import storage
from data_prep.manifest import Manifest, load_manifest
from pretrain.config import DataConfig
from pretrain.data.stream import Cursor, ShardStream, plan_shards
from pretrain.data.tokenizer import Tokenizer
from pretrain.data.transforms import image_transform
from pretrain.preemption import shield_worker

log = logging.getLogger(__name__)

# 2: a cursor's offset is (shuffle block x shuffle_buffer + outputs taken from it); 1: raw samples
# emitted through the old streaming shuffle buffer (read as 2 with a warning: the same progress).
STATE_VERSION = 2


class TrainLoader:
    def __init__(self, cfg: DataConfig, image_size: int, tokenizer: Tokenizer, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifest: Manifest = load_manifest(cfg.train)
        self.tokenizer = tokenizer
        self.transform = image_transform(image_size)
        self.slots = max(1, cfg.num_workers)
        consumers = self.world_size * self.slots
        if self.manifest.total_samples < consumers:
            raise ValueError(
                f"dataset {storage.redact(self.manifest.root)} has {self.manifest.total_samples} samples, fewer than "
                f"ranks x workers = {consumers}: lower data.num_workers or use more data"
            )
        # Collective in a distributed run (rank 0 lists the shards' folder once, every rank gets the plan).
        self.plan = plan_shards(self.manifest)
        for problem in self.plan.problems:
            log.warning("data: %s", problem)
        self.cursors: dict[int, Cursor] = {}
        self.batches = 0  # batches taken by the training loop
        self.corrupt = 0  # corrupt samples skipped in those batches
        self.wait_seconds = 0.0  # time the training loop spent blocked on data
        self._iter: Optional[Any] = None

    @property
    def consumers(self) -> int:
        return self.world_size * self.slots

    @property
    def epoch(self) -> float:
        """Epochs completed by this rank, fractional (from the slowest slot)."""
        per_consumer = self.manifest.total_samples // self.consumers
        if not self.cursors:
            return 0.0
        return min(c.epoch + c.offset / per_consumer for c in self.cursors.values())

    def _start(self) -> None:
        stream = ShardStream(
            self.manifest, self.tokenizer, self.transform, self.cfg.batch_size, self.rank, self.world_size,
            self.cfg.num_workers, self.cfg.seed, self.cfg.shuffle_buffer,
            cursors=self.cursors, slot_offset=self.batches % self.slots, plan=self.plan,
        )
        # Its own generator: starting workers draws a seed, and drawing it from the global RNG
        # would shift the model's random numbers (FLIP's masks) in a resumed run, whose loader
        # starts at a different point of the RNG stream than the uninterrupted run's did.
        # Pinned batches on CUDA: the step's non_blocking copies then overlap the previous step's compute.
        loader = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=torch.cuda.is_available(),
                            prefetch_factor=4 if self.cfg.num_workers else None, worker_init_fn=shield_worker,
                            generator=torch.Generator().manual_seed(self.cfg.seed + self.rank))
        self._iter = iter(loader)

    def next(self) -> dict[str, Any]:
        """The next batch: images (B, 3, H, W) float32, tokens (B, L) int64, uids (B strings)."""
        if self._iter is None:
            self._start()
        t0 = time.perf_counter()
        batch = next(self._iter)
        self.wait_seconds += time.perf_counter() - t0
        self.cursors[int(batch["slot"])] = Cursor(*(int(x) for x in batch["cursor"]))
        self.corrupt += int(batch["corrupt"])
        self.batches += 1
        return {"images": batch["images"], "tokens": batch["tokens"], "uids": batch["uids"]}

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "consumers": self.consumers,
            "batches": self.batches,
            "corrupt": self.corrupt,
            "cursors": {slot: [c.epoch, c.offset] for slot, c in self.cursors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") == 1:
            log.warning("data: this checkpoint's data position was saved by an older clipforge (streaming shuffle); "
                        "the stream continues as far into each epoch, in the new block order: a few samples of "
                        "this epoch may be seen twice or not at all")
        elif state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        if state["consumers"] != self.consumers:
            raise ValueError(
                f"the checkpoint's data position was saved with {state['consumers']} consumers (ranks x "
                f"data.num_workers); this run has {self.consumers} ({self.world_size} x {self.slots}). "
                "Resume with the same world size and data.num_workers."
            )
        self.close()
        self.batches, self.corrupt = state["batches"], state["corrupt"]
        self.cursors = {int(slot): Cursor(*c) for slot, c in state["cursors"].items()}

    def close(self) -> None:
        self._iter = None  # drops the DataLoader iterator, which shuts its workers down
