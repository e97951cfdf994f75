"""NaN/inf losses: every rank checks its loss before backward, the ranks agree, and the step is
skipped or the run stops (``nonfinite.action``). Never silent: a warning names the step and the
ranks, ``train/nonfinite_steps`` counts the skipped steps, a stop is an error with the reason.

Why the check comes before ``engine.backward``: a skipped step must leave no trace, and DeepSpeed
has no uniform way to drop gradients once they are in its buffers (ZeRO-2/3 reduce them into
partitions during backward). Not calling backward and step at all leaves weights, optimizer
moments, the LR schedule and DeepSpeed's counters exactly as they were, in every ZeRO stage and
precision. (Like DeepSpeed's and Megatron's own skipped steps, it does not advance the LR schedule.)

With ``engine.grad_accum`` > 1 this holds when the first micro-batch of a step is the bad one. A
later one finds the earlier micro-batches' gradients already inside DeepSpeed, which cannot be
taken back exactly, so the run stops (with that explanation) rather than apply a partial update.

A finite loss with non-finite gradients: DeepSpeed's ZeRO optimizers check the gradient norm and
drop such an update themselves (``engine.skipped_steps``); the trainer reports that the same way.

All ranks run the same decision (one all_reduce of a flag per rank per micro-step), so they skip or
stop at the same step and stay in lockstep.
"""
from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.distributed as dist

from pretrain.config import DebugConfig, NonfiniteAction, NonfiniteConfig

log = logging.getLogger(__name__)


class NonfiniteLossError(RuntimeError):
    """The run stops on a non-finite step; the message says why and what was kept."""


class Counts(Protocol):
    """Where the counts live (the trainer's resumable state)."""

    nonfinite_steps: int
    nonfinite_streak: int


class NonfiniteGuard:
    def __init__(self, cfg: NonfiniteConfig, debug: DebugConfig, rank: int, world_size: int, device: torch.device) -> None:
        self.cfg = cfg
        self.nan_at_steps = frozenset(debug.nan_at_steps)
        self.rank, self.world_size, self.device = rank, world_size, device

    def inject(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Test-only fault (``debug.nan_at_steps``): rank 0's loss of those steps becomes NaN."""
        if step in self.nan_at_steps and self.rank == 0:
            return loss * float("nan")
        return loss

    def bad_ranks(self, loss: torch.Tensor) -> list[int]:
        """Collective: the ranks whose ``loss`` is NaN or inf (empty: every rank's is finite)."""
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        flags[self.rank] = (~torch.isfinite(loss.detach())).any().to(torch.int32)  # no host sync before the reduce
        if self.world_size > 1:
            dist.all_reduce(flags)
        return [r for r, bad in enumerate(flags.tolist()) if bad]

    def good_step(self, counts: Counts) -> None:
        counts.nonfinite_streak = 0

    def bad_step(self, counts: Counts, step: int, what: str, last_checkpoint: int, micro: int = 0, accum: int = 1) -> None:
        """Count a step whose update was not applied; raise :class:`NonfiniteLossError` when the
        run must stop instead (action stop, too many in a row, or a partial accumulation)."""
        counts.nonfinite_steps += 1
        counts.nonfinite_streak += 1
        kept = (f"the last checkpoint (step {last_checkpoint}) is untouched; resume from it with a lower optim.lr "
                "or after removing the bad data" if last_checkpoint > 0 else "no checkpoint was written")
        if micro > 0:
            raise NonfiniteLossError(
                f"{what} at step {step}, micro-batch {micro + 1} of engine.grad_accum={accum}: the earlier micro-batches' "
                f"gradients are already inside DeepSpeed and cannot be dropped exactly, so the run stops; {kept}")
        if self.cfg.action == NonfiniteAction.stop:
            raise NonfiniteLossError(f"{what} at step {step} (nonfinite.action=stop); {kept}")
        if counts.nonfinite_streak >= self.cfg.max_consecutive:
            raise NonfiniteLossError(
                f"{what} at step {step}: {counts.nonfinite_streak} non-finite steps in a row "
                f"(nonfinite.max_consecutive={self.cfg.max_consecutive}), the run has diverged; {kept}")
        if self.rank == 0:
            log.warning("%s at step %d: update skipped (weights and optimizer unchanged); %d skipped so far, "
                        "%d in a row (stops at nonfinite.max_consecutive=%d)", what, step, counts.nonfinite_steps,
                        counts.nonfinite_streak, self.cfg.max_consecutive)
