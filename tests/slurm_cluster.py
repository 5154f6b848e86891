"""A real one-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd on
localhost, all state in a temporary directory (docs/design.md §4 says why each setting).

It needs Debian's ``slurmctld slurmd slurm-client munge`` packages (`.ci/run` installs them) and
root (slurmd starts jobs as their user). Where either is missing the cluster is *unavailable*
(:class:`ClusterUnavailable`, the tests skip); where both are there and it still does not come
up, that is an error with the daemons' logs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
MUNGE_RUN = Path("/run/munge")
STARTUP_SECONDS = 60

CONFIG = """\
ClusterName=infinitrain-tests
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Without this a requeued job waits 120 s before it may start again.
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerParameters=sched_interval=1,bf_interval=1
# Lets this small machine declare 4 CPUs: two 2-task jobs at once.
SlurmdParameters=config_overrides
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=tests Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the test cluster (the message says what is missing)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


class LocalSlurm:
    """Start with :meth:`start`, point SLURM commands at it with :attr:`env`, :meth:`stop`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.config)}
        self.munged_pid: int | None = None
        """Set only when this cluster started munged (an already running one is left alone)."""

    def start(self) -> LocalSlurm:
        missing = [name for name in PROGRAMS if shutil.which(name) is None]
        if missing:
            raise ClusterUnavailable(f"{', '.join(missing)} not on PATH (apt-get install "
                                     "slurmctld slurmd slurm-client munge, as .ci/run does)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("not root: slurmd must start jobs as their user")
        for folder in ("state", "spool"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.config.write_text(CONFIG.format(
            host=socket.gethostname().split(".")[0], root=self.root,
            ctld_port=free_port(), slurmd_port=free_port()))
        self._start_munged()
        try:
            for daemon in ("slurmctld", "slurmd"):
                self._launch(daemon, "-f", str(self.config))
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        running = pid_in(MUNGE_RUN / "munged.pid")
        if running is not None and alive(running):
            return
        MUNGE_RUN.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        self._launch("runuser", "-u", "munge", "--", shutil.which("munged"))
        self.munged_pid = pid_in(MUNGE_RUN / "munged.pid")

    def _launch(self, *command: str) -> None:
        """Start a daemon (it forks into the background); its complaint if it will not."""
        result = self.run(*command, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit status {result.returncode}\n"
                               f"{result.stderr}\n{self.logs()}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test SLURM node is {state or 'not up'!r} after "
                           f"{STARTUP_SECONDS} s\n{self.logs()}")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A SLURM client command against this cluster."""
        return subprocess.run(command, env=self.env, check=check, capture_output=True, text=True)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as fields (JobState, Restarts, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in line.split() if "=" in item)

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}"
                         for path in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False)
        daemons = [pid for name in ("slurmctld.pid", "slurmd.pid")
                   if (pid := pid_in(self.root / name)) is not None]
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in daemons) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in daemons:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.munged_pid is not None and alive(self.munged_pid):
            os.kill(self.munged_pid, signal.SIGTERM)
