"""A real single-node Slurm cluster (Debian's munge, slurmctld, slurmd) started for the tests.

Everything lives in one temporary directory: munge key and socket, ``slurm.conf``, state and spool
directories, pid and log files. The daemons run in the foreground as our own child processes, so
teardown stops exactly what was started here and nothing else. Ports are picked free, so several
clusters (parallel test runs, a system Slurm) never clash.

Usage::

    with SlurmCluster() as cluster:
        job = cluster.sbatch("-n", "2", "--wrap", "srun hostname")
        cluster.wait_job(job, {"COMPLETED"})

``slurm_cluster_session()`` is the body of the session-scoped ``slurm_cluster`` fixture: it skips
when this machine cannot run Slurm (not root, packages missing) unless ``CI=true``, where it fails.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from launch.local import free_port

REPO = Path(__file__).resolve().parents[2]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
INSTALL_HINT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
# Job states after which a job no longer holds resources (scontrol's spelling).
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                      "BOOT_FAIL", "DEADLINE"})


class SlurmClusterError(RuntimeError):
    """A daemon did not start or a command failed; the message carries the daemon log tails."""


def missing_requirements() -> str | None:
    """Why this machine cannot start a cluster (``None`` when it can)."""
    if os.geteuid() != 0:
        # slurmd must run as root to start jobs as their users; SlurmUser=root keeps it to one user.
        return "a local Slurm cluster needs root"
    missing = [name for name in (*DAEMONS, *CLIENTS, "munge") if shutil.which(name, path=_PATH) is None]
    if missing:
        return f"Slurm/munge binaries missing ({', '.join(missing)}); install with: {INSTALL_HINT}"
    return None


# The daemons live in /usr/sbin, which a non-login PATH may lack.
_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])


def _node_hardware() -> dict[str, str]:
    """``slurmd -C``'s view of this machine (NodeName, CPUs, sockets, cores, threads, RealMemory)."""
    out = subprocess.run([shutil.which("slurmd", path=_PATH) or "slurmd", "-C"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return dict(item.split("=", 1) for item in out.splitlines()[0].split())


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, configured and owned by the test session.

    ``cred_expire`` is short because Slurm keeps a requeued job pending for that long (so slurmd
    forgets the revoked credential of the previous run); 120 s by default would make requeue tests
    slow. ``kill_wait`` is the SIGTERM-to-SIGKILL grace Slurm gives a job on cancel/requeue/timeout.
    """

    def __init__(self, root: Path | None = None, *, partition: str = "debug", cred_expire: int = 5,
                 kill_wait: int = 5, start_timeout: float = 30.0) -> None:
        self.partition = partition
        self.cred_expire = cred_expire
        self.kill_wait = kill_wait
        self.start_timeout = start_timeout
        self._own_root = root is None
        # munged refuses a socket whose directories are not executable by everyone (pytest's tmp dirs
        # are 0700), and a UNIX socket path must stay under 108 bytes: so a short 0755 dir in /tmp.
        self.root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge.socket"
        # munged in the foreground logs to stderr only, which _spawn sends to <name>.out.
        self.logs = {"munged": self.root / "munged.out", "slurmctld": self.root / "slurmctld.log",
                     "slurmd": self.root / "slurmd.log"}
        self.hostname = ""
        self.env: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(keep_files=exc[0] is not None)

    def start(self) -> None:
        """Write the configuration, start the three daemons and wait until the node is idle."""
        reason = missing_requirements()
        if reason:
            raise SlurmClusterError(reason)
        hardware = _node_hardware()
        self.hostname = hardware["NodeName"]
        self._write_munge_key()
        self._write_conf(hardware)
        # Marker variable: every process of this cluster (daemons, stepds, job tasks) inherits it, so
        # teardown can find and end exactly those processes by pid.
        self.env = {**os.environ, "PATH": _PATH, "SLURM_CONF": str(self.conf), "SLURM_TEST_CLUSTER": str(self.root)}
        try:
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait("slurmctld answers ping", lambda: "UP" in self.run(["scontrol", "ping"], check=False).stdout)
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.hostname])
            self._wait(f"node {self.hostname} idle", lambda: self.node_state() == "idle")
        except BaseException:
            self.stop(keep_files=True)
            raise

    def stop(self, keep_files: bool = False) -> None:
        """Cancel all jobs, stop the daemons started here, end their leftovers; remove the directory."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            # slurmd's exit does not end running jobs (slurmstepd outlives it): cancel them first.
            self.run(["scancel", f"--partition={self.partition}"], check=False)
            deadline = time.monotonic() + self.kill_wait + 5
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.2)
        for name in reversed(DAEMONS):
            proc = self._procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self._kill_leftovers()
        if self._own_root and not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- queries --------------------------------------------------------------------------------

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; with ``check`` a failure raises with logs."""
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})})
        if check and proc.returncode != 0:
            raise SlurmClusterError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}\n{self.log_tails()}")
        return proc

    def sbatch(self, *args: str) -> int:
        """Submit with ``sbatch --parsable``; return the job id."""
        # --chdir: a job without -o writes slurm-<id>.out into its working directory: keep it in ours.
        out = self.run(["sbatch", "--parsable", f"--partition={self.partition}", f"--chdir={self.root}", *args]).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt as ``Restarts``, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "--oneliner", str(job_id)]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(self, job_id: int, states: set[str] | frozenset[str], timeout: float = 30.0) -> dict[str, str]:
        """Poll until the job's state is one of ``states``; return its record, or raise on timeout."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info["JobState"] not in states:
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} still {info['JobState']} after {timeout:.0f}s "
                                        f"(wanted {sorted(states)}): {info}\n{self.log_tails()}")
            time.sleep(0.2)
            info = self.job(job_id)
        return info

    def node_state(self) -> str:
        """The node's state as sinfo prints it (``idle``, ``mixed``, ``alloc``, ``down*``...)."""
        return self.run(["sinfo", "-h", "-n", self.hostname, "-o", "%T"], check=False).stdout.strip()

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every daemon log, for error messages."""
        return "\n".join(f"--- {path} ---\n{_tail(path, lines)}" for path in self.logs.values())

    # -- internals ------------------------------------------------------------------------------

    def _write_munge_key(self) -> None:
        # munged requires the key to be owned by the user it runs as (root here) and unreadable by others.
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

    def _write_conf(self, hardware: Mapping[str, str]) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        real_memory = int(hardware["RealMemory"])
        # Declare a little less memory than slurmd measures, else a small drift marks the node invalid.
        memory = max(1, min(int(real_memory * 0.9), real_memory - 256))
        topology = " ".join(f"{k}={hardware[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                            "ThreadsPerCore") if k in hardware)
        lines = [
            f"ClusterName=test{os.getpid()}",
            # The address is given so that no DNS lookup of the hostname is needed.
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs['slurmctld']}",
            f"SlurmdLogFile={self.logs['slurmd']}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups anywhere: linuxproc tracks processes by parentage, task/none binds nothing, so
            # slurmd starts in a container without systemd or a writable cgroup tree.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            # Cores, not whole nodes, are allocated: two 1-CPU jobs share the node.
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "MailProg=/bin/true",
            # Batch jobs may be requeued (scontrol requeue, preemption, --requeue).
            "JobRequeue=1",
            # A slurmd that (re)registers healthy goes back into service without an admin.
            "ReturnToService=2",
            f"KillWait={self.kill_wait}",
            # The main scheduler's periodic pass starts requeued jobs once their begin time passes;
            # its default of 60 s would dominate every requeue test.
            "SchedulerParameters=sched_interval=1",
            f"NodeName={self.hostname} NodeAddr=127.0.0.1 {topology} RealMemory={memory} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        # Read from the same directory as slurm.conf. Never consulted with the plugins above, but if a
        # Slurm build loads the cgroup plugin anyway, do not ask a (missing) systemd for a scope.
        (self.root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    def _start_munged(self) -> None:
        paths = {"socket": self.munge_socket, "key-file": self.root / "munge.key",
                 "pid-file": self.root / "munged.pid", "seed-file": self.root / "munged.seed"}
        self._spawn("munged", ["munged", "--foreground", *(f"--{k}={v}" for k, v in paths.items())])
        self._wait("munged socket", lambda: self.run(["munge", "-n", "-S", str(self.munge_socket)], check=False)
                   .returncode == 0)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        # Daemon stdout/stderr go beside their log file: startup errors land there before logging is set up.
        with open(self.root / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                 cwd=self.root, start_new_session=True)

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmClusterError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                            f"{_tail(self.root / f'{name}.out')}\n{self.log_tails()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"timed out after {self.start_timeout:.0f}s waiting for {what}\n{self.log_tails()}")
            time.sleep(0.1)

    def _kill_leftovers(self) -> None:
        """End slurmstepd and job processes of this cluster that outlived the daemons (found by marker)."""
        marker = f"SLURM_TEST_CLUSTER={self.root}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def slurm_cluster_session(**kwargs: object) -> Iterator[SlurmCluster]:
    """Body of a session fixture: yield a started cluster; skip (fail under ``CI=true``) if impossible."""
    reason = missing_requirements()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests: {reason}", pytrace=False)
        pytest.skip(reason)
    with SlurmCluster(**kwargs) as cluster:  # type: ignore[arg-type]
        yield cluster


def launch(cluster: SlurmCluster, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m launch ARGS`` as a user of ``cluster`` would run it, with a secret in the environment
    (the tests check it never reaches a script or config) and W&B offline."""
    env = {**cluster.env, "PYTHONPATH": str(REPO), "WANDB_API_KEY": "wandb-secret-0123456789", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
