"""No host tensor where the accelerator's is needed: every collective and every op of the training,
evaluation and scoring paths, run on 2 gloo ranks with a stand-in accelerator (sim_accelerator.py)
that raises where CUDA/NCCL would. A GPU run would otherwise be the first to find such a bug (an
all-reduce of a CPU tensor kills every NCCL run at its first log step)."""
from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.local import free_port
from tests.pretrain.sim_accelerator import DeviceMismatch, sim_accelerator

CONF_EXPERIMENTS = Path(__file__).resolve().parents[2] / "conf" / "experiment"
B = 4  # rows per rank

# (experiment, extra overrides): every experiment as shipped, plus the loss paths they do not take.
TRAIN_CASES = {e.stem: [] for e in sorted(CONF_EXPERIMENTS.glob("*.yaml"))} | {
    "demo+naive_loss": ["loss.impl=naive"],
    "demo+full_loss": ["loss.impl=naive", "loss.local_loss=false"],
    "demo+ring": ["loss.mode=ring"],
    "siglip+ring": ["loss.mode=ring"],
    "limoe+expert_parallel": ["model.moe.ep_size=2"],
}


def _config(name: str, extra: list[str]):
    from launch.config import compose_train_config

    cfg = compose_train_config([f"experiment={name.split('+')[0]}", "size=tiny_test", f"data.batch_size={B}", *extra])
    cfg.model.text.vocab_size = 100
    return cfg


def _inputs(cfg, dev: torch.device, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    size, length = cfg.model.vision.image_size, cfg.model.text.context_length
    images = torch.randn(B, 3, size, size, generator=g)  # (B, 3, H, W), loaded on the host
    tokens = torch.randint(4, 100, (B, length), generator=g)  # (B, L)
    tokens[:, length // 2] = 3  # eos
    tokens[:, length // 2 + 1:] = 0
    return images.to(dev), tokens.to(dev)


def _train_case(name: str, extra: list[str]) -> Callable[[torch.device, int, int], None]:
    """A training step as the trainer runs it, minus DeepSpeed (whose CPU accelerator would itself
    allocate on the host): forward, finiteness vote, backward, optimizer step, logged metrics."""

    def run(dev: torch.device, rank: int, world: int) -> None:
        from pretrain.engine import enable_expert_parallel, rank_mean
        from pretrain.models import build_model
        from pretrain.nonfinite import NonfiniteGuard
        from pretrain.task import build_task
        from pretrain.trainer import Trainer

        cfg = _config(name, extra)
        torch.manual_seed(0)
        model = build_model(cfg.model, eos_id=3)
        enable_expert_parallel(model, cfg.model.moe.ep_size)
        task = build_task(cfg, model).to(dev)
        optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
        images, tokens = _inputs(cfg, dev, rank)
        out = task(images, tokens)
        assert not NonfiniteGuard(cfg.nonfinite, cfg.debug, rank, world, dev).bad_ranks(out["loss"])
        out["loss"].backward()
        optimizer.step()
        names = sorted(out["metrics"])
        means = rank_mean([out["contrastive"], 0.25, *(out["metrics"][k] for k in names)], dev)
        assert len(means) == 2 + len(names) and means[1] == 0.25
        Trainer.sync_buffers(SimpleNamespace(model=task.model))  # type: ignore[arg-type]

    return run


def _evaluate(dev: torch.device, rank: int, world: int) -> None:
    """Zero-shot and retrieval with the sets held on the host, as the Evaluator loads them."""
    from pretrain.config import EvalConfig
    from pretrain.evaluate import Evaluator, RetrievalData, ZeroShotData
    from pretrain.models import build_model

    cfg = _config("demo", [])
    torch.manual_seed(0)
    model = build_model(cfg.model, eos_id=3).to(dev)
    size = cfg.model.vision.image_size
    tokenizer = lambda texts: torch.randint(4, 100, (len(texts), cfg.model.text.context_length))  # noqa: E731
    evaluator = Evaluator(EvalConfig(batch_size=3, zeroshot=[], retrieval=[]), tokenizer, lambda im: im)  # type: ignore[arg-type]
    evaluator.zeroshot["set"] = ZeroShotData(torch.randn(7, 3, size, size), torch.arange(7) % 6,
                                             [f"class {i}" for i in range(6)], ["a {}.", "the {}."])
    evaluator.retrieval["set"] = RetrievalData(torch.randn(7, 3, size, size), [f"caption {i}" for i in range(7)])
    metrics = evaluator.run(model, dev, torch.float32)
    assert len(metrics) == 2 + 6 and all(0 <= v <= 1 for v in metrics.values())


def _preemption(dev: torch.device, rank: int, world: int) -> None:
    from pretrain.preemption import Preemption

    assert Preemption(dev).stop_requested() is False


def _checkpoint_cadence(dev: torch.device, rank: int, world: int) -> None:
    """checkpoint.every_minutes: rank 0's clock decides for every rank, through a broadcast."""
    from pretrain.trainer import Trainer

    cfg = _config("demo", ["checkpoint.every_minutes=1"])
    trainer = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(device=dev), last_save_time=0.0 if rank == 0 else 1e12)
    assert Trainer.checkpoint_due(trainer) is True  # type: ignore[arg-type]


def _clip_score(dev: torch.device, rank: int, world: int) -> None:
    """The data_prep stage's scoring batch, with its model on the accelerator."""
    from data_prep.filters.clip_score import ClipScoreFilter, Scorer
    from pretrain.models import build_model

    cfg = _config("demo", [])
    model = build_model(cfg.model, eos_id=3).to(dev).eval()
    stage = ClipScoreFilter.__new__(ClipScoreFilter)  # scoring needs no config: no export folder to make
    images, tokens = _inputs(cfg, torch.device("cpu"), rank)
    scores = stage._score(Scorer(model, lambda t: tokens, lambda im: im, dev), images, tokens)
    assert len(scores) == B and all(-1 <= s <= 1 for s in scores)


def _host_tensor_in_collective(dev: torch.device, rank: int, world: int) -> None:
    dist.all_reduce(torch.ones(3))  # the bug log_metrics had: must raise


def _host_labels_compared(dev: torch.device, rank: int, world: int) -> None:
    torch.randn(4, 5, device=dev).topk(2).indices == torch.arange(4)[:, None]  # must raise


CASES: dict[str, Callable[[torch.device, int, int], None]] = {
    **{f"train/{name}": _train_case(name, extra) for name, extra in TRAIN_CASES.items()},
    "evaluate": _evaluate,
    "preemption": _preemption,
    "checkpoint_cadence": _checkpoint_cadence,
    "clip_score": _clip_score,
}
# The stand-in accelerator itself: these must raise DeviceMismatch, or the cases above prove nothing.
MUST_RAISE = {"harness/host_tensor_in_collective": _host_tensor_in_collective,
              "harness/host_labels_compared": _host_labels_compared}


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    from pretrain.engine import init_distributed

    init_distributed("gloo")
    dist.barrier()
    torch.set_num_threads(1)
    results: dict[str, str | None] = {}
    for name, case in {**CASES, **MUST_RAISE}.items():
        try:
            with sim_accelerator() as dev:
                case(dev, rank, world)
            results[name] = None
        except DeviceMismatch:
            results[name] = traceback.format_exc(limit=-4)
        dist.barrier(timeout=timedelta(seconds=60))  # a case that failed on one rank only cannot hang the next
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str | None]]:
    out = str(tmp_path_factory.mktemp("device") / "results")
    mp.spawn(_rank, args=(2, free_port(), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}") for r in range(2)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_host_tensor_where_the_accelerator_needs_one(outcomes: list[dict[str, str | None]], case: str) -> None:
    for rank, results in enumerate(outcomes):
        assert results[case] is None, f"rank {rank}: {case} puts a tensor on the wrong device:\n{results[case]}"


@pytest.mark.parametrize("case", sorted(MUST_RAISE))
def test_the_stand_in_accelerator_catches_the_bug(outcomes: list[dict[str, str | None]], case: str) -> None:
    for results in outcomes:
        assert results[case] is not None and "DeviceMismatch" in results[case]
