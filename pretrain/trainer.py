"""The training loop: one Trainer for every model; the loop reads as its named steps."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data_prep.atomic import atomic_write
from pretrain import engine as engine_lib
from pretrain.checkpoint import Checkpointer, rng_state, set_rng_state
from pretrain.config import Arch, TrainConfig, to_dict
from pretrain.data import TrainLoader, Tokenizer, image_transform
from pretrain.data.uid_log import UidLog
from pretrain.evaluate import Evaluator
from pretrain.models import ContrastiveModel, build_model
from pretrain.monitor import Monitor, NullMonitor, make_monitor
from pretrain.nonfinite import NonfiniteGuard, NonfiniteLossError
from pretrain.preemption import Preemption
from pretrain.schedule import masking_enabled
from pretrain.task import build_task
from pretrain.throughput import Throughput, device_peak_tflops

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


@dataclass
class TrainState:
    """Global progress; saved in DeepSpeed's client state (per-rank state goes in rank files)."""

    step: int = 0
    samples: int = 0
    train_seconds: float = 0.0  # time in training steps (evals and checkpoints excluded)
    wandb_run_id: Optional[str] = None
    nonfinite_steps: int = 0  # steps whose update was skipped (NaN/inf): pretrain.nonfinite
    nonfinite_streak: int = 0  # of them, the ones in a row up to now


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.dist = engine_lib.init_distributed(cfg.engine.backend)
        self.run_dir = Path(cfg.run_dir)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.tokenizer = Tokenizer(cfg.data.tokenizer, cfg.model.text.context_length)
        if cfg.model.text.vocab_size == 0:
            cfg.model.text.vocab_size = self.tokenizer.vocab_size
        model = build_model(cfg.model, eos_id=self.tokenizer.eos_id)
        # From here on each rank draws its own random numbers (FLIP's masks, router noise).
        torch.manual_seed(cfg.seed + 1 + self.dist.rank)
        moe_layers = engine_lib.enable_expert_parallel(model, cfg.model.moe.ep_size)
        self.engine = engine_lib.initialize(build_task(cfg, model), cfg)
        if moe_layers:
            log.info("%d MoE layers x %d experts, expert-parallel over %d rank(s)",
                     moe_layers, cfg.model.moe.num_experts, cfg.model.moe.ep_size)
        self.dtype = engine_lib.compute_dtype(cfg)
        # Before the loader's worker processes start: on CPU the peak is a measured matmul, and
        # workers decoding images on the same cores would halve it (MFU over 100% on CPU runs).
        dist.barrier()
        peak = cfg.engine.peak_tflops or device_peak_tflops(self.dist.device, self.dtype == torch.bfloat16)
        # Installed at start-up, so a signal that arrives while the model and data are still being
        # set up is acted on at the first step boundary. Loader workers ignore both signals (Slurm
        # sends them to every process of the job): their parent finishes the step and checkpoints.
        self.preemption = Preemption(self.dist.device)
        self.preemption.install()
        self.loader = TrainLoader(cfg.data, cfg.model.vision.image_size, self.tokenizer, self.dist.rank, self.dist.world_size)
        self.evaluator = Evaluator(cfg.eval, self.tokenizer, image_transform(cfg.model.vision.image_size))
        self.guard = NonfiniteGuard(cfg.nonfinite, cfg.debug, self.dist.rank, self.dist.world_size, self.dist.device)
        self.uid_log = UidLog(self.run_dir, self.dist.rank, cfg.data.log_uids)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.dist.rank, self.dist.world_size)
        self.samples_per_step = self.dist.world_size * cfg.data.batch_size * cfg.engine.grad_accum
        self.throughput = Throughput(3 * model.flops_per_sample(), peak, self.dist.world_size)
        self.masking = True  # what the model starts with (only FLIP has a switch)
        self.state = TrainState()
        self.saved_step = -1  # the step of the last checkpoint this process wrote (no double saves)
        self.checkpoint_step = 0  # the step of the newest checkpoint, written or resumed from (0: none)
        self.preempted = False  # train() stopped early on a signal: see pretrain.preemption
        self.last_save_time = time.monotonic()  # checkpoint.every_minutes counts from here (rank 0's clock)
        self.last_metrics: dict[str, torch.Tensor] = {}
        self.monitor: Monitor = NullMonitor()
        self.config_dict = to_dict(cfg)  # resolved once (vocab_size filled in above); fixed from here on
        config_yaml = OmegaConf.to_yaml(self.config_dict).encode()
        # Copied into every checkpoint so each is self-contained (export needs both).
        self.checkpoint_files = {"config.yaml": config_yaml, "tokenizer.model": self.tokenizer.model_bytes}
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.run_dir / "config.yaml") as f:
                f.write(config_yaml)

    @property
    def model(self) -> ContrastiveModel:
        return self.engine.module.model

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        self.maybe_resume()
        self.uid_log.open(self.state.step)  # forgets the steps after the checkpoint: they are trained again
        self.monitor = make_monitor(self.cfg.wandb, self.run_dir, self.config_dict, self.state.wandb_run_id, self.dist.is_main)
        self.state.wandb_run_id = self.monitor.run_id
        log.info("training %s: %d steps x %d samples on %d rank(s), ZeRO-%d, %s",
                 self.cfg.model.name, self.cfg.steps, self.samples_per_step, self.dist.world_size,
                 self.cfg.engine.zero_stage, self.cfg.engine.precision.value)
        interval = Interval.start(self)
        self.last_save_time = time.monotonic()
        end = self.cfg.stop_at or self.cfg.steps
        while self.state.step < end:
            losses = self.train_step()
            self.state.step += 1
            self.state.samples += self.samples_per_step
            if self.state.step % self.cfg.log_every == 0 or self.state.step == self.cfg.steps:
                self.log_metrics(losses, interval)
                interval = Interval.start(self)
            if self.cfg.eval.every and self.state.step % self.cfg.eval.every == 0 and self.state.step < self.cfg.steps:
                self.evaluate(limit=self.cfg.eval.periodic_limit)
                interval = Interval.start(self)
            if self.state.step < end and (self.state.step % self.cfg.checkpoint.every == 0 or self.checkpoint_due()):
                self.save_checkpoint()
                interval = Interval.start(self)
            if self.preemption.stop_requested() and self.state.step < self.cfg.steps:
                return self.stop_on_signal()
        if self.state.step < self.cfg.steps:  # stopped early (stop_at): a later run resumes
            self.save_checkpoint()
            log.info("stopped at step %d of %d (stop_at); resume with the same run_dir", self.state.step, self.cfg.steps)
            return {"steps": self.state.step}
        final = self.evaluate(limit=None)
        self.save_checkpoint()
        return self.write_summary(final)

    def train_step(self) -> dict[str, float]:
        """One optimizer step: grad_accum micro-steps of forward, finiteness check, backward,
        (boundary) update. A step with a non-finite loss is skipped or stops the run."""
        t0 = time.perf_counter()
        step = self.state.step + 1  # the step this call trains, as logged
        loss_sum = torch.zeros(())
        masking = masking_enabled(self.cfg, self.state.step)
        if masking != self.masking:  # FLIP's phase 2: unmasked, so each step costs more FLOPs
            self.model.set_masking(masking)
            self.masking = masking
            self.throughput.train_flops_per_sample = 3 * self.model.flops_per_sample()
        uids: list[str] = []
        dropped_by_deepspeed = self.engine.skipped_steps
        for micro in range(self.cfg.engine.grad_accum):
            batch = self.loader.next()
            uids += batch["uids"]
            images = batch["images"].to(self.dist.device, self.dtype, non_blocking=True)  # (B, 3, H, W)
            tokens = batch["tokens"].to(self.dist.device, non_blocking=True)  # (B, L)
            out = self.engine(images, tokens)
            loss = self.guard.inject(out["loss"], step)
            bad = self.guard.bad_ranks(loss)  # collective: every rank takes the same branch
            if bad:
                return self.skip_step(step, micro, f"non-finite loss on rank(s) {', '.join(map(str, bad))}", uids, out, t0)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed updates only at the accumulation boundary
            loss_sum += out["contrastive"].float().cpu()
        skipped = self.engine.skipped_steps > dropped_by_deepspeed  # a finite loss, non-finite gradients
        if skipped:
            self.record_bad_step(step, "non-finite gradients (DeepSpeed dropped the update)")
        else:
            self.guard.good_step(self.state)
        self.uid_log.write(step, uids, skipped=skipped)
        self.state.train_seconds += time.perf_counter() - t0
        self.last_metrics = out["metrics"]  # moe/*: tensors, made floats only when logged
        return {"loss": loss_sum.item() / self.cfg.engine.grad_accum, "logit_scale": out["logit_scale"].float().item()}

    def skip_step(self, step: int, micro: int, what: str, uids: list[str], out: dict[str, Any], t0: float) -> dict[str, float]:
        """No backward, no engine.step: weights, optimizer and schedule stay as they were. The
        step's other micro-batches are still consumed, so a step always moves the data one step."""
        self.record_bad_step(step, what, micro)
        for _ in range(micro + 1, self.cfg.engine.grad_accum):
            uids += self.loader.next()["uids"]
        self.uid_log.write(step, uids, skipped=True)
        self.state.train_seconds += time.perf_counter() - t0
        self.last_metrics = out["metrics"]
        return {"loss": float("nan"), "logit_scale": out["logit_scale"].float().item()}

    def record_bad_step(self, step: int, what: str, micro: int = 0) -> None:
        """Count it (and warn); on a stop, log the count before the error ends the run."""
        try:
            self.guard.bad_step(self.state, step, what, self.checkpoint_step, micro, self.cfg.engine.grad_accum)
        except NonfiniteLossError:
            self.monitor.log({"train/nonfinite_steps": float(self.state.nonfinite_steps)}, step=step)
            raise

    def log_metrics(self, losses: dict[str, float], interval: "Interval") -> None:
        """Collective (all ranks): rank-averaged loss, data-wait fraction and model metrics (the
        last step's moe/*), then rank 0 logs."""
        seconds = time.perf_counter() - interval.t0
        wait_frac = (self.loader.wait_seconds - interval.wait0) / max(seconds, 1e-9)
        names = sorted(self.last_metrics)  # the same on every rank: same model, same layers
        packed = engine_lib.rank_mean([losses["loss"], wait_frac, *(self.last_metrics[k] for k in names)], self.dist.device)
        samples = (self.state.step - interval.step0) * self.samples_per_step
        metrics = {
            "train/loss": packed[0],
            "train/lr": self.engine.get_lr()[0],
            "train/logit_scale": losses["logit_scale"],
            **self.throughput.metrics(samples, seconds),
            "data/wait_frac": packed[1],
            "data/epoch": self.loader.epoch,
            "data/corrupt_samples": float(self.loader.corrupt),
            "train/nonfinite_steps": float(self.state.nonfinite_steps),
            **{k: packed[2 + i] for i, k in enumerate(names)},
        }
        if self.cfg.model.arch == Arch.flip:  # which phase the last step ran in
            metrics["train/mask_ratio"] = self.cfg.model.flip.mask_ratio * masking_enabled(self.cfg, self.state.step - 1)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        self.monitor.log(metrics, step=self.state.step)
        log.info("step %d/%d | loss %.4f | lr %.2e | scale %.1f | %.0f samples/s | mfu %.1f%% | data wait %.0f%%",
                 self.state.step, self.cfg.steps, metrics["train/loss"], metrics["train/lr"], metrics["train/logit_scale"],
                 metrics["train/samples_per_sec"], 100 * metrics["train/mfu"], 100 * metrics["data/wait_frac"])

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics in ALIGN's CNN), as DDP
        does: training never reads them, but evaluation and the checkpoint (saved from rank 0)
        do, so every rank must evaluate, and a resumed run continue, with the same ones."""
        for buffer in self.model.buffers():
            dist.broadcast(buffer, src=0)

    def evaluate(self, limit: Optional[int]) -> dict[str, float]:
        t0 = time.perf_counter()
        self.sync_buffers()
        metrics = self.evaluator.run(self.model, self.dist.device, self.dtype, limit=limit)
        self.monitor.log(metrics, step=self.state.step)
        log.info("eval at step %d (%.1fs): %s", self.state.step, time.perf_counter() - t0,
                 " ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in sorted(metrics.items())))
        return metrics

    def stop_on_signal(self) -> dict[str, Any]:
        """A rank got a time-limit warning or a termination signal: checkpoint this step and stop
        (the caller requeues the Slurm job when ``self.preemption.requeue``)."""
        self.preempted = True
        sig = self.preemption.received.name if self.preemption.received else "a signal on another rank"
        log.warning("preemption: %s at step %d of %d; saving a checkpoint and stopping", sig, self.state.step, self.cfg.steps)
        if self.saved_step != self.state.step:
            self.save_checkpoint()
        self.monitor.log({"train/preempted": 1.0}, step=self.state.step)
        return {"steps": self.state.step, "preempted": True}

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_due(self) -> bool:
        """Collective when ``checkpoint.every_minutes`` is set: has rank 0's clock passed it since
        the last save? (Each rank's own clock could differ by a step and split the ranks.)"""
        minutes = self.cfg.checkpoint.every_minutes
        if minutes is None:
            return False
        due = torch.tensor([time.monotonic() - self.last_save_time >= 60 * minutes], dtype=torch.int32, device=self.dist.device)
        dist.broadcast(due, src=0)
        return bool(due.item())

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        self.sync_buffers()
        client_state = {"train_state": asdict(self.state), "config": self.config_dict}
        rank_state = {"data": self.loader.state_dict(), "rng": rng_state()}
        path = self.checkpointer.save(self.engine, self.state.step, client_state, rank_state, self.checkpoint_files)
        self.saved_step = self.checkpoint_step = self.state.step
        self.last_save_time = time.monotonic()
        log.info("checkpoint %s (%.1fs)", path, time.perf_counter() - t0)

    def maybe_resume(self) -> None:
        path = self.checkpointer.resolve(self.cfg.checkpoint.resume)  # collective: every rank loads the same one
        if path is None:
            return
        client_state, rank_state = self.checkpointer.load(self.engine, path)
        self.state = TrainState(**client_state["train_state"])
        self.loader.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        self.checkpoint_step = self.state.step
        log.info("resumed from %s at step %d", path, self.state.step)

    # -- end --------------------------------------------------------------------------------------
    def write_summary(self, final_eval: dict[str, float]) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "steps": self.state.step,
            "samples": self.state.samples,
            "train/samples_per_sec": self.state.samples / max(self.state.train_seconds, 1e-9),
            **final_eval,
        }
        if self.dist.is_main:
            self.monitor.summary(summary)
            with atomic_write(self.run_dir / SUMMARY_FILE, "w") as f:
                json.dump(summary, f, indent=1)
        return summary

    def close(self, finished: bool = True, together: Optional[bool] = None) -> None:
        """Release workers, W&B (a run not ``finished`` shows as failed) and the process group.
        ``together`` (default: ``finished``): every rank came here at the same step, so a barrier is
        safe and lets rank 0 finish writing W&B before torchrun sees the others exit. After a crash, no
        collective: the other ranks may be blocked in a different one, and this rank must exit so
        torchrun stops them."""
        self.loader.close()
        self.uid_log.close()
        self.monitor.close(finished)
        if (finished if together is None else together) and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


@dataclass
class Interval:
    """Where a logging interval started: its time, step and the loader's wait counter."""

    t0: float
    step0: int
    wait0: float

    @classmethod
    def start(cls, trainer: Trainer) -> "Interval":
        return cls(time.perf_counter(), trainer.state.step, trainer.loader.wait_seconds)
