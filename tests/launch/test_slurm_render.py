"""``launcher=slurm`` without a cluster: the rendered sbatch script, --dry-run, config errors, and the
pre-submission checks against stand-in Slurm tools (small bash scripts on PATH)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import compose_train_config
from launch.slurm import render_script
from pretrain.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
IMAGE = "docker://ghcr.io/example/clip:1.0"
TWO_NODES = ["launcher=slurm", "experiment=demo", "launcher.nodes=2", "launcher.gpus_per_node=4",
             "launcher.partition=gpu", "launcher.account=vision", "launcher.qos=high", "launcher.time=1-00:00:00",
             "launcher.mem=256G", "launcher.cpus_per_task=32", f"launcher.container_image={IMAGE}",
             "launcher.container_mounts=[/data:/data:ro]", "+launcher.env.HF_HOME=/data/hf cache",
             "+launcher.backend_env.NCCL_DEBUG=INFO", "+launcher.backend_env.GLOO_SOCKET_IFNAME=ib0", "launcher.rdzv_port=29400"]
SBATCH_ERROR = "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified"
SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789", "HF_TOKEN": "hf_secret_abcdef"}


def launch(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), **SECRETS, **(env or {})}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=full)


def test_two_node_gpu_script_has_every_block(tmp_path: Path) -> None:
    script = render_script(compose_train_config(TWO_NODES), TWO_NODES, workdir=tmp_path)
    run_dir = tmp_path / "runs/demo/train"
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=32",
                 "#SBATCH --mem=256G", "#SBATCH --partition=gpu", "#SBATCH --account=vision", "#SBATCH --qos=high",
                 "#SBATCH --time=1-00:00:00", f"#SBATCH --output={run_dir}/slurm/%j.out", "#SBATCH --open-mode=append",
                 "#SBATCH --export=ALL", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", f"#SBATCH --chdir={tmp_path}"]:
        assert any(s.startswith(line) for s in script.splitlines()), line
    assert "--exclusive" not in script  # cpus_per_task given: not whole nodes
    assert 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert "PORT=29400" in script
    for part in ["srun --nodes=$SLURM_NNODES --ntasks-per-node=1", "--nnodes=$SLURM_NNODES", "--nproc_per_node=4",
                 "--rdzv_backend=c10d", '--rdzv_endpoint="$HEAD:$PORT"', '--rdzv_id="$SLURM_JOB_ID"',
                 f"--container-image={IMAGE}", f"--container-mounts={tmp_path}:{tmp_path},/data:/data:ro",
                 f"--container-workdir={tmp_path}", "python -m torch.distributed.run",  # the image's interpreter
                 "-m pretrain.train launcher=slurm experiment=demo launcher.nodes=2",
                 "export NCCL_DEBUG=INFO", "export GLOO_SOCKET_IFNAME=ib0", "export HF_HOME='/data/hf cache'",
                 "trap forward USR1", 'trap "" USR1']:
        assert part in script, part
    (tmp_path / "job.sbatch").write_text(script)
    check = subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_defaults_whole_nodes_and_port_from_job_id(tmp_path: Path) -> None:
    script = render_script(compose_train_config(["launcher=slurm"]), ["launcher=slurm"], workdir=tmp_path)
    assert "#SBATCH --exclusive" in script and "#SBATCH --gpus-per-node=8" in script and "--nproc_per_node=8" in script
    assert "PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in script and "--partition" not in script
    assert f"{sys.executable} -m torch.distributed.run" in script  # no container: this interpreter
    no_signal = render_script(compose_train_config(["launcher=slurm", "launcher.signal_seconds=0"]), [], workdir=tmp_path)
    assert "--signal" not in no_signal and "--requeue" not in no_signal and "trap forward" not in no_signal
    assert "--max-restarts" not in script and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=" in script
    restarts = render_script(compose_train_config(["launcher=slurm", "launcher.max_restarts=3"]), [], workdir=tmp_path)
    assert '--rdzv_id="$SLURM_JOB_ID" --max-restarts=3' in restarts


def test_dry_run_prints_the_script_writes_nothing_and_keeps_secrets_out(tmp_path: Path) -> None:
    proc = launch(*TWO_NODES, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in proc.stdout
    assert list(tmp_path.iterdir()) == [], "--dry-run writes nothing"
    for secret in SECRETS.values():
        assert secret not in proc.stdout and secret not in proc.stderr


def test_local_dry_run_prints_torchrun(tmp_path: Path, small_build) -> None:
    proc = launch("--dry-run", "--nproc-per-node", "2", f"data.root={small_build.out_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m pretrain.train" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override,expected", [
    ("launcher.nodes=0", "launcher.nodes=0 must be >= 1"),
    ("launcher.time=4h", "launcher.time='4h' is not a Slurm time"),
    ("launcher.mem=lots", "launcher.mem='lots'"),
    ("launcher.procs_per_node=0", "launcher.procs_per_node='0' must be auto or an integer"),
    ("launcher.procs_per_node=9", "launcher.procs_per_node=9 exceeds launcher.gpus_per_node=8"),
    ("launcher.rdzv_port=80", "launcher.rdzv_port=80"),
    ("+launcher.env.WANDB_API_KEY=abc", "launcher.env.WANDB_API_KEY looks like a secret"),
    ("+launcher.backend_env.OMP_NUM_THREADS=4", "launcher.backend_env.OMP_NUM_THREADS: only NCCL_*"),
    ("launcher.signal_seconds=-5", "launcher.signal_seconds=-5"),
])
def test_bad_launcher_config_is_one_clear_line(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        compose_train_config(["launcher=slurm", override])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_unknown_launcher_fails_in_one_line_on_the_command_line(tmp_path: Path) -> None:
    proc = launch("launcher=pbs", "--dry-run", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("config error:"), proc.stderr
    assert "launcher/pbs" in lines[0] and "slurm" in lines[0]


# ---- submission checks against stand-in Slurm tools ----

FAKE = {
    "scontrol": """case "$*" in
  "show partition --oneliner") echo "PartitionName=debug Default=YES MaxNodes=UNLIMITED TotalNodes=2 State=UP";;
  "show partition --oneliner debug") echo "PartitionName=debug Default=YES MaxNodes=UNLIMITED TotalNodes=2 State=UP";;
  "show partition --oneliner gpu") echo "PartitionName=gpu Default=NO MaxNodes=4 TotalNodes=16 State=UP";;
  "show partition --oneliner "*) echo "slurm_load_partitions: Invalid partition name specified" >&2; exit 1;;
  "show job --oneliner "*) echo "JobId=${4} JobState=COMPLETED";;
esac""",
    "sinfo": """case "$*" in
  *--format=%R*) printf 'debug\\ngpu\\n';;
  *--partition=gpu*) echo "gpu:h100:8(S:0-1)|96";;
  *) echo "(null)|2";;
esac""",
    "sbatch": """[ -n "${FAKE_SBATCH_FAIL:-}" ] && { echo "$SBATCH_ERROR" >&2; exit 1; }
echo "4242;testc\"""",
    "srun": 'echo "  --container-image=[USER/][TAG@]IMAGE"',
    "squeue": '[ "$3" = 4242 ] && [ -z "${FAKE_DONE:-}" ] && echo RUNNING; exit 0',
    "scancel": 'echo "$@" > "$FAKE_LOG"',
}


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "scancel.log"), "SBATCH_ERROR": SBATCH_ERROR}


@pytest.mark.parametrize("overrides,expected", [
    (["launcher.partition=cpu"], "launcher.partition=cpu: no such partition (this cluster has: debug, gpu)"),
    (["launcher.nodes=3"], "launcher.nodes=3 is more than partition debug gives one job (2 node(s))"),
    (["launcher.partition=gpu", "launcher.nodes=5"], "launcher.nodes=5 is more than partition gpu gives one job (4 node(s))"),
    (["launcher.gpus_per_node=8"], "launcher.gpus_per_node=8 is more than the 0 GPU(s) of a node in partition debug"),
    (["launcher.partition=gpu", "launcher.gpus_per_node=16", "launcher.procs_per_node=8"], "the 8 GPU(s) of a node in partition gpu"),
    (["launcher.cpus_per_task=4"], "launcher.cpus_per_task=4 is more than the 2 CPU(s)"),
    (["launcher.container_image=/no/such/image.sqsh"], "launcher.container_image=/no/such/image.sqsh: no such image file"),
])
def test_what_the_cluster_cannot_give_fails_before_submission(tmp_path: Path, fake_slurm: dict[str, str], small_build,
                                                             overrides: list[str], expected: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = launch("launcher=slurm", "launcher.gpus_per_node=0", *overrides, f"data.root={small_build.out_dir}", cwd=work, env=fake_slurm)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
    assert list(work.iterdir()) == [], "nothing is written before the checks pass"


def test_missing_pyxis_fails_in_one_line(tmp_path: Path, fake_slurm: dict[str, str]) -> None:
    (Path(fake_slurm["PATH"].split(":")[0]) / "srun").write_text("#!/bin/bash\necho '  --nodes=N'\n")
    proc = launch("launcher=slurm", "launcher.gpus_per_node=0", f"launcher.container_image={IMAGE}", cwd=tmp_path, env=fake_slurm)
    assert proc.returncode == 2 and "needs the pyxis plugin" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_submit_records_script_config_and_job_id_then_status_logs_cancel(tmp_path: Path, fake_slurm: dict[str, str],
                                                                         small_build) -> None:
    common = ["launcher=slurm", "launcher.gpus_per_node=0", "launcher.procs_per_node=2", f"data.root={small_build.out_dir}",
              "run_dir=run"]
    proc = launch(*common, cwd=tmp_path, env=fake_slurm)
    assert proc.returncode == 0 and proc.stdout.strip() == "4242", proc.stderr
    out = tmp_path / "run" / "slurm"
    assert (out / "job_id").read_text() == "4242\n"
    script = (out / "job.sbatch").read_text()
    assert "--nproc_per_node=2" in script and "#SBATCH --exclusive" in script
    assert all(s not in script and s not in (out / "config.yaml").read_text() for s in SECRETS.values())
    assert "kind: slurm" in (out / "config.yaml").read_text()
    assert launch(*common, cwd=tmp_path, env=fake_slurm).returncode == 0  # a resubmit appends
    assert (out / "job_id").read_text() == "4242\n4242\n"

    failed = launch(*common, cwd=tmp_path, env={**fake_slurm, "FAKE_SBATCH_FAIL": "1"})
    assert failed.returncode != 0
    assert failed.stderr == SBATCH_ERROR + "\n"  # verbatim

    status = launch("status", "run", cwd=tmp_path, env=fake_slurm)
    assert "job 4242: RUNNING" in status.stdout and "run: running" in status.stdout, status.stderr
    (out / "4242.out").write_text("step 1 loss 4.1\n")
    assert launch("logs", "run", cwd=tmp_path, env=fake_slurm).stdout == "step 1 loss 4.1\n"
    assert "cancelled job(s) 4242 4242" in launch("cancel", "run", cwd=tmp_path, env=fake_slurm).stdout
    assert Path(fake_slurm["FAKE_LOG"]).read_text().strip() == "4242 4242"

    (tmp_path / "run" / "summary.json").write_text("{}")
    done = launch("status", "run", cwd=tmp_path, env={**fake_slurm, "FAKE_DONE": "1"})
    assert "job 4242: COMPLETED" in done.stdout and "run: finished" in done.stdout
    assert "nothing to cancel" in launch("cancel", "run", cwd=tmp_path, env={**fake_slurm, "FAKE_DONE": "1"}).stdout


def test_status_of_a_run_never_submitted_is_one_line(tmp_path: Path) -> None:
    proc = launch("status", "nowhere", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: nowhere: no Slurm job was submitted for this run (no nowhere/slurm/job_id)"
