"""No pickle from checkpoints of unknown origin: a file holding an object whose ``__reduce__`` would
create a trap file is refused, with an error naming the file and the refused global, by every
reader of checkpoint files (our rank files, DeepSpeed's engine.load_checkpoint, export's
consolidation for ZeRO and stage 0), and the trap is never created."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.local import rank_env
from pretrain.checkpoint import COMPLETE, Checkpointer, CheckpointError, rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[2]


class Trap:
    """Unpickling this runs ``touch <path>``: what a planted checkpoint could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class NoEngine:
    """Checkpointer.load's engine: DeepSpeed's part is tested below, in its own process."""

    def load_checkpoint(self, *args, **kwargs):
        return None, {"train_state": {}}


def rank_checkpoint(tmp_path: Path, rank_state: object) -> Path:
    path = tmp_path / "checkpoints" / "step_00000001"
    path.mkdir(parents=True)
    torch.save(rank_state, path / "rank_00000.pt")
    (path / COMPLETE).write_text(json.dumps({"step": 1, "world_size": 1}))
    return path


def test_a_planted_rank_file_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    trap = tmp_path / "trapped"
    path = rank_checkpoint(tmp_path, {"data": {}, "rng": Trap(trap)})
    with pytest.raises(CheckpointError) as refused:
        Checkpointer(tmp_path / "checkpoints", 2, 0, 1).load(NoEngine(), path)
    assert str(refused.value).startswith(f"refusing to load {path / 'rank_00000.pt'}: it holds a pickled object outside "
                                         "the allow-list (global posix.system)")
    assert not trap.exists()
    torch.load(path / "rank_00000.pt", weights_only=False)  # the control: full unpickling does run it
    assert trap.exists(), "the trap works, so its absence above means the loader refused it"


def test_rank_files_resume_rng_exactly_old_and_new_format(tmp_path: Path) -> None:
    """New rank files hold the numpy state as plain ints; older ones a pickled numpy array, which
    is allowed (rebuilding an array runs no code). Both restore every generator exactly."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian is part of numpy's state
    new = rng_state()
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2).tolist())
    for name, state in (("new", new), ("old", old)):
        path = rank_checkpoint(tmp_path / name, {"data": {}, "rng": state})
        _, rank_state = Checkpointer(tmp_path / name / "checkpoints", 2, 0, 1).load(NoEngine(), path)
        set_rng_state(rank_state["rng"])
        assert (random.random(), np.random.normal(), np.random.rand(), torch.rand(2).tolist()) == expected, name


# DeepSpeed's own files, in a process of its own (a 1-rank gloo group): engine.load_checkpoint through
# the engine pretrain.engine.initialize installs, then export's consolidation of ZeRO-2 and stage 0.
DEEPSPEED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import deepspeed, torch
    from pretrain import engine as E
    from pretrain.checkpoint import CheckpointError

    out, trap, results = sys.argv[1], sys.argv[2], {}

    class Trap:
        def __reduce__(self):
            return (os.system, (f"touch {trap}",))
    E.init_distributed("gloo")

    def engine(stage):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        E.use_safe_checkpoint_engine(eng)  # what pretrain.engine.initialize does
        eng.backward(eng(torch.randn(2, 4)).sum())
        eng.step()
        return eng

    def plant(path):  # the attacker rewrites a file of a good checkpoint (a trusted read of our own test file)
        state = torch.load(path, weights_only=False)
        state["extra"] = Trap()
        torch.save(state, path)

    def attempt(name, fn):
        try:
            fn()
            results[name] = "loaded"
        except CheckpointError as e:
            results[name] = str(e)

    for stage in (2, 0):
        eng, tag = engine(stage), f"stage{stage}"
        eng.save_checkpoint(out, tag=tag, save_latest=False)
        attempt(f"clean_load_{tag}", lambda: eng.load_checkpoint(out, tag=tag))
        attempt(f"clean_export_{tag}", lambda: E.consolidated_state_dict(os.path.join(out, tag)))
        states = "zero_pp_rank_0_mp_rank_00_optim_states.pt" if stage else "mp_rank_00_model_states.pt"
        plant(os.path.join(out, tag, states))
        attempt(f"planted_load_{tag}", lambda: eng.load_checkpoint(out, tag=tag))
        attempt(f"planted_export_{tag}", lambda: E.consolidated_state_dict(os.path.join(out, tag)))
    results["trap_exists"] = os.path.exists(trap)
    print("RESULTS " + json.dumps(results))
""")


def test_deepspeed_checkpoints_load_weights_only_and_refuse_planted_pickles(tmp_path: Path) -> None:
    trap = tmp_path / "trapped"
    env = {**rank_env(1), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, str(tmp_path / "ckpt"), str(trap)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert results.pop("trap_exists") is False
    assert not trap.exists()
    for tag, states in (("stage2", "zero_pp_rank_0_mp_rank_00_optim_states.pt"), ("stage0", "mp_rank_00_model_states.pt")):
        assert results[f"clean_load_{tag}"] == results[f"clean_export_{tag}"] == "loaded", results
        for what in ("load", "export"):
            refusal = results[f"planted_{what}_{tag}"]
            assert refusal.startswith(f"refusing to load {tmp_path / 'ckpt' / tag / states}: it holds a pickled object "
                                      "outside the allow-list (global posix.system)"), (what, tag, refusal)
