"""Secrets in the environment never reach logs, saved configs, W&B files, datasets or sbatch scripts.

Each secret has a distinctive value; every file a run or a build writes (W&B's binary ``.wandb``
log included: protobuf keeps strings as raw UTF-8 bytes, so a byte search finds them) and every
captured output is searched for each value. The run starts from a git clone whose remote URL holds
a token, since W&B records the git remote of the working directory.

Checked by reading, not only by searching: W&B's metadata records (program, args, git, host) hold
no environment, and the resolved config W&B gets holds no environment dump.
"""
from __future__ import annotations

import glob
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.local import rank_env
from tests import stamps

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "WANDB_API_KEY": "wandbkey-7f3c9a1e5b2d4f60",
    "HF_TOKEN": "hf_SecretTok3n9d8c7b6a5",
    "AWS_SECRET_ACCESS_KEY": "awsSecretKey+0aB1cD2eF3gH4",
    "MY_SERVICE_TOKEN": "svc-token-5e6f7a8b9c0d",
}
GIT_TOKEN = "ghp_GitRemoteTok3n4f5e6d"  # in the clone's remote URL, as `https://<token>@host/...`
TIMEOUT = 420


def secret_env() -> dict[str, str]:
    return {**rank_env(1), "PYTHONPATH": str(REPO), **SECRETS}


def leaks(paths: list[Path], *texts: str) -> list[str]:
    """``"<secret name> in <where>"`` for every secret value found in a file under ``paths`` or in ``texts``."""
    values = {**SECRETS, "git remote token": GIT_TOKEN}
    found = []
    for root in paths:
        for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            data = f.read_bytes()
            found += [f"{name} in {f}" for name, value in values.items() if value.encode() in data]
    for i, text in enumerate(texts):
        found += [f"{name} in output {i}" for name, value in values.items() if value in text]
    return found


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=secret_env(), capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git for the clone W&B inspects")
def test_training_run_writes_no_secret(small_build, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    git = ["git", "-C", str(clone), "-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "remote", "add", "origin", f"https://{GIT_TOKEN}@github.com/example/clip.git"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], check=True)
    run_dir = tmp_path / "run"
    proc = run(["-m", "launch", "train", "--nproc-per-node", "1", f"run_dir={run_dir}", f"data.root={small_build.out_dir}",
                "size=tiny_test", "steps=3", "data.batch_size=16", "data.num_workers=1", "log_every=1",
                "optim.warmup_steps=1", "checkpoint.every=3", "eval.zeroshot=[]", "eval.retrieval=[]",
                "wandb.mode=offline"], cwd=clone)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    wandb_dir = next(iter(glob.glob(str(run_dir / "wandb" / "offline-run-*"))), None)
    assert wandb_dir is not None, "W&B wrote no offline run"
    written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    for expected in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert expected in written, written
    assert any(w.endswith(".wandb") for w in written) and any(w.endswith("logs/debug.log") for w in written)
    assert any(w.startswith("checkpoints/") and w.endswith("config.yaml") for w in written), written
    assert leaks([run_dir], proc.stdout, proc.stderr) == []
    assert [p.name for p in clone.iterdir()] == [".git"], "the run wrote into its working directory"

    # What W&B records about the process: no environment, and the git remote without its token.
    from tests.pretrain.test_train_distributed import wandb_records

    records = wandb_records(next(iter(glob.glob(f"{wandb_dir}/run-*.wandb"))))
    envs = [r.environment for r in records if r.WhichOneof("record_type") == "environment" and r.environment.program]
    assert envs and envs[0].program == "-m pretrain.train"
    assert envs[0].git.remote_url == "https://github.com/example/clip.git"
    assert not any(name in str(r) for r in records for name in ("WANDB_API_KEY", "HF_TOKEN", "PATH=", "HOME="))
    config = next(r.run.config for r in records if r.WhichOneof("record_type") == "run")
    assert {item.key for item in config.update} & {"env", "environ", "environment", "os_environ"} == set()


def test_dataset_build_writes_no_secret(tmp_path: Path) -> None:
    out = tmp_path / "data"
    proc = run(["-m", "data_prep", "build", f"out_dir={out}", "sources.fashion_mnist.limit=40", f"sources.tuxpaint.root={stamps.ROOT}",
                "sources.tuxpaint.limit=20",
                "tokenizer.vocab_size=100", "workers.processes=1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "train" / "manifest.json").is_file()
    assert leaks([tmp_path], proc.stdout, proc.stderr) == []


def launch_in_process(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``python -m launch ARGS`` in this process (the secrets are in its environment): (exit code, stdout + stderr)."""
    from launch.__main__ import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_slurm_scripts_hold_no_secret_and_secret_names_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    image = "launcher.container_image=docker://example/clip:1"  # paths are the image's: no local data needed
    code, train = launch_in_process(["launcher=slurm", "launcher.nodes=2", "launcher.gpus_per_node=4", image,
                                     "+launcher.env.HF_HOME=/hf", "--dry-run"], capsys)
    assert code == 0 and train.startswith("#!/bin/bash"), train
    assert "#SBATCH --export=ALL" in train  # secrets reach the job through the environment only
    code, prep = launch_in_process(["prep", "--dry-run", "launcher=slurm", "launcher.nodes=2", f"out_dir={tmp_path / 'ds'}"],
                                   capsys)
    assert code == 0 and "#SBATCH" in prep, prep
    assert leaks([], train, prep) == []
    for name, value in SECRETS.items():  # naming a secret in launcher.env: refused, its value never echoed
        code, refused = launch_in_process(["launcher=slurm", image, f"+launcher.env.{name}={value}", "--dry-run"], capsys)
        assert code == 2 and f"launcher.env.{name} looks like a secret" in refused, refused
        assert value not in refused
    assert list(tmp_path.iterdir()) == [], "--dry-run writes nothing"
