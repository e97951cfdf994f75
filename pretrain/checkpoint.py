"""Atomic, verified, exactly-resumable checkpoints in DeepSpeed's own format, loaded without pickle.

Layout: ``<run_dir>/checkpoints/step_00000100/`` holds DeepSpeed's files for that tag, one
``rank_XXXXX.pt`` per rank (data position and RNG states: both differ between ranks) and
``COMPLETE``. Every rank writes into ``checkpoints/.incoming/<tag>``; once every rank reports its
writes succeeded, rank 0 writes ``COMPLETE`` (step, world size, and every file's byte size) and
renames the folder into place. A crash or a failed write (full disk) mid-save leaves only
``.incoming``, which the next save clears, so the newest complete checkpoint is never damaged.

``resume=auto`` takes the newest complete checkpoint whose files still have the sizes ``COMPLETE``
recorded, warning about (and skipping) damaged ones. Every file is read with
``torch.load(weights_only=True)``: tensors and plain containers only, so a planted checkpoint
cannot run code (see :func:`safe_load`; DeepSpeed's own reads go through it too, ``engine.py``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from data_prep.atomic import UnwritableDirError, atomic_write, ensure_writable_dir
from pretrain.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
INCOMING = ".incoming"
# Captured at import: engine.py's scoped patch of torch.load (for zero_to_fp32) calls safe_load.
_torch_load = torch.load


class CheckpointError(RuntimeError):
    """A checkpoint is damaged, unsafe to load, or could not be written; the message names it and why."""


# -- RNG states: plain lists and tensors, so the rank files load with weights_only=True ------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)  # MT19937: key (624 uint32), pos, has_gauss, gauss
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next)
        "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = ("MT19937", np.array(numpy_state["key"], dtype=np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["gauss"])
    np.random.set_state(numpy_state)  # a tuple as np.random.get_state() returns: older rank files
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- loading without pickle's code execution ------------------------------------------------------
def _numpy_array_globals() -> list[Any]:
    """What a pickled numpy array needs: rank files written before the RNG states were plain lists
    hold numpy's MT19937 key as an array. Rebuilding an array only copies bytes (no code runs)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def _refusal(error: pickle.UnpicklingError) -> str:
    """What torch's (long, multi-paragraph) weights-only error refused: a global or a class."""
    text = str(error)
    if found := re.search(r"GLOBAL ([\w.]+)", text):
        return f"global {found.group(1)}"
    if found := re.search(r"but got <class '([\w.]+)'>", text):
        return f"class {found.group(1)}"
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(boilerplate)]
    return lines[0] if lines else "not loadable with weights_only=True"


def safe_load(path: str | os.PathLike, allow: Sequence[Any] = (), map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)``: tensors, plain containers and the classes in ``allow``.

    A checkpoint can come from anywhere (a shared folder, a download); full unpickling would run
    any code its author put in it. Raises CheckpointError naming the file and the refused object."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return _torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds a pickled object outside the allow-list ({_refusal(e)}); "
            "checkpoints are read with torch.load(weights_only=True) so that a file of unknown origin cannot "
            "run code. Do not use this file unless you know who wrote it and why it contains that object"
        ) from None
    except (EOFError, OSError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError) or (isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e)):
            raise  # not a damaged file (DeepSpeed may expect FileNotFoundError for optional files)
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().split(". ")[0]
        raise CheckpointError(f"cannot read {path}: {detail or type(e).__name__} (a truncated or overwritten "
                              "file reads like this)") from None


# -- verification -----------------------------------------------------------------------------------
# COMPLETE records each file's byte size, not a hash. A hash would also catch bit rot, but reading a
# multi-GB checkpoint back costs rank 0 seconds to minutes at every save and every resume (sha256
# runs at ~1-2 GB/s on one core), while the faults this guards against (a crash mid-write, a full
# disk, an interrupted copy or sync of a run folder) all show as a missing or short file. Silent
# corruption of data at rest is the storage layer's job (checksumming filesystems, object stores).
def verify_checkpoint(path: Path) -> Optional[str]:
    """None if every file ``COMPLETE`` lists has its recorded size, else what is wrong (one line)."""
    try:
        meta = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        return f"its {COMPLETE} file is unreadable ({e})"
    files = meta.get("files")
    if files is None:
        log.debug("%s: %s has no file list (written by an older version): its files cannot be verified", path, COMPLETE)
        return None
    problems = []
    for name, size in sorted(files.items()):
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if actual != size:
            what = "truncated" if actual < size else "changed since it was written"
            problems.append(f"{name} has {actual} bytes, {size} were written ({what})")
    if len(problems) > 3:
        problems[3:] = [f"{len(problems) - 3} more damaged files"]
    return "; ".join(problems) or None


def step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints under ``root`` that were published (have ``COMPLETE``), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """``auto`` -> newest intact complete checkpoint or None; ``none`` -> None; else that checkpoint,
    which must be complete and intact (an explicit choice never silently falls back)."""
    if resume == "none":
        return None
    if resume == "auto":
        damaged = []
        for path in reversed(complete_checkpoints(root)):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged: %s; falling back to the previous complete checkpoint", path, problem)
            damaged.append(path.name)
        if damaged:
            raise CheckpointError(f"every checkpoint under {root} is damaged ({', '.join(damaged)}; see the warnings "
                                  "above): move them away to start over, or set checkpoint.resume=none")
        return None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint.resume={resume}: not a complete checkpoint (no {COMPLETE} file in it)")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint.resume={resume} is damaged: {problem}; choose another checkpoint "
                              "(resume=auto skips damaged ones)")
    return path


def check_run_dir(cfg: TrainConfig) -> None:
    """Before any rank builds anything: run_dir is writable and an explicitly named
    checkpoint.resume is complete and intact. Raises ConfigError (one line)."""
    try:
        ensure_writable_dir(cfg.run_dir, "run_dir")
        if cfg.checkpoint.resume not in ("auto", "none"):
            resolve_resume(cfg.checkpoint.resume, Path(cfg.run_dir) / "checkpoints")
    except (UnwritableDirError, CheckpointError) as e:
        raise ConfigError(str(e)) from None


# -- saving -----------------------------------------------------------------------------------------
@dataclass
class WriteLog:
    """Files one rank wrote during a save (absolute path -> bytes) and the first write that failed.

    A failed write is recorded instead of raised, so that every rank still runs the same
    collectives and all of them learn of it together (see Checkpointer.save)."""

    sizes: dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None

    def write(self, path: Path, writer: Callable[[Any], None]) -> None:
        if self.error is not None:
            return  # one failure fails the save: do not fill the disk further
        try:
            with atomic_write(path) as f:
                writer(f)
            self.sizes[str(path)] = path.stat().st_size
        except (OSError, RuntimeError) as e:
            self.fail(path, e)

    def fail(self, path: str | os.PathLike, error: BaseException) -> None:
        if self.error is None:
            self.error = f"{Path(path).name}: {_describe(error)}{_free_space(Path(path))}"


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror  # the file is named by the caller
    # torch's zip writer reports ENOSPC/EIO as "[enforce fail at inline_container.cc:N] . <detail>"
    detail = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(error).strip().splitlines()[-1] if str(error).strip() else "")
    return f"write failed ({type(error).__name__}: {detail or 'no detail'})"


def _free_space(path: Path) -> str:
    """' (N MB free on that filesystem)' for ``path``: torch's writer does not say the disk is full."""
    for folder in (path.parent, *path.parents):
        try:
            return f" ({shutil.disk_usage(folder).free / 1e6:.1f} MB free on that filesystem)"
        except OSError:
            continue
    return ""


def _engine_write_log(engine: Any) -> WriteLog:
    """The WriteLog of the engine's checkpoint writer (engine.SafeCheckpointEngine), fresh; a plain
    WriteLog when the engine has none (its write errors then raise from save_checkpoint)."""
    writer = getattr(engine, "checkpoint_engine", None)
    if writer is None or not hasattr(writer, "write_log"):
        return WriteLog()
    writer.write_log = WriteLog()
    return writer.write_log


class Checkpointer:
    def __init__(self, root: str | os.PathLike, keep: int, rank: int, world_size: int) -> None:
        self.root, self.keep, self.rank, self.world_size = Path(root), keep, rank, world_size

    def save(self, engine: Any, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
             files: Optional[dict[str, bytes]] = None) -> Path:
        """Collective: every rank calls it. ``files`` (name -> content, e.g. the resolved config and
        the tokenizer) are written by rank 0 so the folder is self-contained. Returns the folder;
        raises CheckpointError on every rank when any rank's write failed (nothing is published)."""
        tag = f"step_{step:08d}"
        incoming, final = self.root / INCOMING / tag, self.root / tag
        if self.rank == 0:  # debris of crashed or failed saves; only one save runs at a time
            shutil.rmtree(self.root / INCOMING, ignore_errors=True)
        dist.barrier()
        deepspeed_writes = _engine_write_log(engine)
        engine.save_checkpoint(str(incoming.parent), tag=tag, client_state=client_state, save_latest=False)
        own = WriteLog(dict(deepspeed_writes.sizes), deepspeed_writes.error)
        own.write(incoming / f"rank_{self.rank:05d}.pt", lambda f: torch.save(rank_state, f))
        reports: list[Optional[WriteLog]] = [None] * self.world_size
        dist.all_gather_object(reports, own)  # every rank's files are written, or why not
        outcome: list[Optional[str]] = [None]
        if self.rank == 0:
            outcome[0] = self._publish(step, incoming, final, reports, files or {})
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            previous = complete_checkpoints(self.root)
            raise CheckpointError(
                f"checkpoint {final} could not be written: {outcome[0]}. Nothing was published: the newest complete "
                f"checkpoint is still {previous[-1] if previous else '(none)'}, which resume=auto uses; "
                f"free space or fix {self.root} and start again")
        return final

    def _publish(self, step: int, incoming: Path, final: Path, reports: list[Optional[WriteLog]],
                 files: dict[str, bytes]) -> Optional[str]:
        """Rank 0: write ``files`` and ``COMPLETE``, rename into place, prune. Returns why not, or None."""
        failed = [f"rank {r}: {report.error}" for r, report in enumerate(reports) if report and report.error]
        if failed:
            shutil.rmtree(incoming, ignore_errors=True)  # free the space the partial files hold
            others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
            return failed[0] + others
        own = WriteLog()
        for name, content in files.items():
            own.write(incoming / name, lambda f, content=content: f.write(content))
        written = [item for report in (*reports, own) if report for item in report.sizes.items()]
        sizes = {Path(p).relative_to(incoming).as_posix(): n for p, n in written if Path(p).is_relative_to(incoming)}
        for path in incoming.rglob("*"):  # what no rank reported (an engine without a write log): as rank 0 sees it
            if path.is_file():
                sizes.setdefault(path.relative_to(incoming).as_posix(), path.stat().st_size)
        meta = {"step": step, "world_size": self.world_size, "files": dict(sorted(sizes.items()))}
        own.write(incoming / COMPLETE, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        if own.error is None:
            try:
                replaced = incoming.with_name(f"{final.name}.replaced")
                if final.exists():  # a re-save of the same step: move the old one aside, then replace it
                    os.replace(final, replaced)
                os.replace(incoming, final)
                shutil.rmtree(replaced, ignore_errors=True)
            except OSError as e:
                own.fail(final, e)
                if replaced.exists() and not final.exists():
                    with contextlib.suppress(OSError):
                        os.replace(replaced, final)  # put the previous save of this step back
        if own.error is not None:
            shutil.rmtree(incoming, ignore_errors=True)
            return f"rank 0: {own.error}"
        self._prune()
        self._warn_if_next_save_may_not_fit(final, sum(sizes.values()))
        return None

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _warn_if_next_save_may_not_fit(self, final: Path, size: int) -> None:
        free = shutil.disk_usage(final).free
        if free < size:
            log.warning("only %.1f MB free on the disk of %s, less than one checkpoint (%.1f MB): the next save will "
                        "likely fail; free space or lower checkpoint.keep", free / 1e6, self.root, size / 1e6)

    # -- loading ----------------------------------------------------------------------------------
    def resolve(self, resume: str) -> Optional[Path]:
        """Collective: :func:`resolve_resume` on rank 0, its answer given to every rank, so every
        rank loads the same checkpoint (and the warnings about damaged ones are logged once)."""
        answer: list[Any] = [None]
        if self.rank == 0:
            try:
                answer[0] = ("path", resolve_resume(resume, self.root))
            except CheckpointError as e:
                answer[0] = ("error", str(e))
        dist.broadcast_object_list(answer, src=0)
        kind, value = answer[0]
        if kind == "error":
            raise CheckpointError(value)
        return value

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
        rank_state = safe_load(path / f"rank_{self.rank:05d}.pt", allow=_numpy_array_globals())
        return client_state, rank_state
