"""Training entry point: config -> build -> train -> close.

    torchrun --nproc_per_node=2 -m pretrain.train model=demo steps=300     # or: python -m launch train ...
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

from pretrain.checkpoint import check_run_dir
from pretrain.config import ConfigError, to_config
from pretrain.data.check import check_inputs

EXIT_CONFIG = 2  # the config was rejected before any work
EXIT_NONFINITE = 3  # a non-finite loss stopped the run (nonfinite.*); the last checkpoint is intact


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed's ZeRO still calls this collective by its old name; torch warns at every call site.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(dict_cfg: DictConfig) -> None:
    setup_logging()
    try:
        cfg = to_config(dict_cfg)
        cfg.check_world(int(os.environ.get("WORLD_SIZE", 1)))
        check_inputs(cfg)
        check_run_dir(cfg)  # writable; an explicit checkpoint.resume intact
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    from pretrain.nonfinite import NonfiniteLossError
    from pretrain.preemption import requeue_job, slurm_job_id
    from pretrain.trainer import Trainer  # after validation: a bad config fails before heavy imports

    trainer = Trainer(cfg)
    finished = False
    stopped = None
    try:
        trainer.train()
        finished = True
    except NonfiniteLossError as e:  # every rank raises it at the same step: an error, not a crash
        stopped = e
    finally:
        trainer.close(finished, together=finished or stopped is not None)
    if stopped is not None:
        print(f"rank {trainer.dist.rank}: training stopped: {stopped}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    # Last, after every rank's checkpoint and shutdown: the requeue kills this job.
    job_id = slurm_job_id()
    if trainer.preempted and trainer.preemption.requeue and job_id and trainer.dist.is_main:
        requeue_job(job_id)


if __name__ == "__main__":
    main()
