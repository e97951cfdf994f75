"""data_prep SIGKILLed (its whole process group) at 5 random moments of one build, then run to the
end: shards, manifests, decisions and tokenizer equal an uninterrupted build's, byte for byte.

The moments are drawn on the timeline of a measured uninterrupted build: uniform in [0, T], each
mapped to (units done by then, seconds since the last of them), so a resumed build is killed at the
same point of the work (planning, inside a unit, between units, during the merge) however much of
it earlier runs already did. Seed: ``CHAOS_SEED`` (default: a fresh one, printed for replay).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.data_prep.fingerprint import fingerprint
from tests.data_prep.kill import POLL_S, done_units, kill_when, start

KILLS = 5
ONE_PROCESS = "workers.processes=1"  # one worker: the timeline is the same from run to run


@dataclass
class Timeline:
    seconds: float  # the whole uninterrupted build, process start to exit
    unit_done: list[float]  # seconds after start at which the k-th unit was seen DONE

    def point(self, t: float) -> tuple[int, float]:
        """Moment ``t`` as (units done by then, seconds after the last of them or after start)."""
        k = sum(1 for u in self.unit_done if u <= t)
        return k, t - (self.unit_done[k - 1] if k else 0.0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Timeline]:
    """One uninterrupted build, timed unit by unit: its fingerprint and timeline."""
    out = tmp_path_factory.mktemp("uninterrupted") / "data"
    proc = start(out, ONE_PROCESS)
    t0 = time.monotonic()
    unit_done: list[float] = []
    while proc.poll() is None:
        unit_done += [time.monotonic() - t0] * (done_units(out) - len(unit_done))
        time.sleep(POLL_S)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr.read()
    unit_done += [seconds] * (done_units(out) - len(unit_done))
    return fingerprint(out), Timeline(seconds, unit_done)


def chaos_seed() -> int:
    return int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))


def kill_at(out: Path, units: int, after: float) -> bool:
    """Start (resume) the build; SIGKILL it ``after`` seconds past the moment ``units`` units are
    done (past its start if 0). False if it finished first."""
    proc = start(out, ONE_PROCESS)
    anchor = time.monotonic() if units == 0 else None

    def ready() -> bool:
        nonlocal anchor
        if anchor is None and done_units(out) >= units:
            anchor = time.monotonic()
        return anchor is not None and time.monotonic() - anchor >= after

    return kill_when(proc, ready)


def test_killed_at_random_moments_resumes_to_identical_output(reference, tmp_path: Path) -> None:
    want, timeline = reference
    seed = chaos_seed()
    rng = random.Random(seed)
    moments = sorted(rng.uniform(0, timeline.seconds) for _ in range(KILLS))
    plan = [timeline.point(t) for t in moments]
    replay = f"CHAOS_SEED={seed}; build {timeline.seconds:.1f} s, {len(timeline.unit_done)} units; kills (units, +s): " + \
        ", ".join(f"({k}, +{s:.2f})" for k, s in plan)
    print(replay)

    out = tmp_path / "data"
    killed = [kill_at(out, k, s) for k, s in plan]
    print(f"kills landed: {killed}")
    assert sum(killed) >= KILLS - 1, f"only {sum(killed)} of {KILLS} kills landed before the build ended ({replay})"
    proc = start(out, ONE_PROCESS)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{replay}\n{err}"
    assert fingerprint(out) == want, f"the resumed dataset differs from the uninterrupted one ({replay})"
