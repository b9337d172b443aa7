"""The launchers against real cluster software on this machine (loopback only).

Slurm (munged, slurmctld, slurmd from Debian's packages) runs as a one-node cluster from a
generated slurm.conf; sshd serves DeepSpeed's pdsh launcher; torchrun forms two "nodes" on
127.0.0.1. Every training run uses the tiny CPU config with two processes in fp32, and its
exported reranker is compared with that of one uninterrupted `launch/torchrun.sh --nproc-per-node
2` run: the result must not depend on the launcher, the rendezvous or a preemption.

The daemons and the reference run are started once per session; each launcher trains once (a
start of the trainer costs far more than its steps, so the Slurm job is interrupted twice rather
than submitted twice).

These tests need root and the daemons' binaries (`.ci/run` installs them); without them they are
skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from grerank_dist.config import load_config

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
EVAL_FILE = ROOT / "configs" / "data" / "toy_test.jsonl"
MAX_STEPS = 12
# Every run: the same steps; the seed and data come from the config. No periodic checkpoint: the
# only ones an interrupted run can resume from are those its signals made it write.
TRAIN_OVERRIDES = [f"train.max_steps={MAX_STEPS}", "train.save_every=0", "train.log_every=1"]
TIMEOUT = 300


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def missing(binaries: list[str]) -> str | None:
    """Why this machine cannot run the daemons, or None."""
    if os.geteuid() != 0:
        return "needs root to start the daemons (CI runs as root)"
    absent = [name for name in binaries if shutil.which(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install slurm-wlm munge openssh-server pdsh)"
    return None


def job_env(**extra: str) -> dict[str, str]:
    """The environment of every launch: this interpreter, this checkout, CPU DeepSpeed."""
    dist_vars = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in dist_vars and not key.startswith(("SLURM_", "SBATCH_", "GRERANK_", "DS_ENV_FILE"))
    }
    env.update(GRERANK_PYTHON=sys.executable, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def trainer_args(out_dir: Path) -> list[str]:
    return ["--config", str(CONFIG), f"output_dir={out_dir}", *TRAIN_OVERRIDES]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(every)


def logged_steps(out_dir: Path) -> list[int]:
    """The steps in metrics.jsonl so far (complete lines only: the trainer may be writing)."""
    path = out_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines()]


def run_launches(commands: list[list[str]], env: dict[str, str]) -> list[str]:
    """Run launcher commands side by side to the end; returns their output. Each runs in a
    session of its own so that a failure or timeout here stops its whole tree (torchrun passes
    SIGTERM on to its workers) instead of leaving trainers behind."""
    procs = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for command in commands
    ]
    try:
        logs = [proc.communicate(timeout=TIMEOUT)[0] for proc in procs]
    except BaseException:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        raise
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{proc.args}: exit {proc.returncode}\n{log[-6000:]}"
    return logs


def assert_same_reranker(out_dir: Path, reference: Path) -> None:
    """The exported weights equal the reference run's (fp32 on CPU; the tolerance only absorbs
    a different summation order of the two ranks' gradients)."""
    got = load_file(out_dir / "reranker" / "model.safetensors")
    want = load_file(reference / "reranker" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), name


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """One node, two processes, never interrupted: the weights every other launch must reach."""
    out = tmp_path_factory.mktemp("reference")
    run_launches([["bash", "launch/torchrun.sh", "--nproc-per-node", "2", "--", *trainer_args(out)]], job_env())
    assert logged_steps(out) == list(range(1, MAX_STEPS + 1))
    return out


# ---------------------------------------------------------------------------------------------
# torchrun: two nodes of one process each
# ---------------------------------------------------------------------------------------------


def test_torchrun_two_nodes_match_one_node(tmp_path, reference):
    """`--nnodes 2` with a c10d rendezvous on 127.0.0.1, node ranks 0 and 1 started as two
    launches: the same reranker as one node of two processes."""
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    run_launches([
        ["bash", "launch/torchrun.sh", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
         "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes", "--", *trainer_args(out)]
        for rank in range(2)
    ], job_env())
    assert logged_steps(out) == list(range(1, MAX_STEPS + 1))
    assert_same_reranker(out, reference)


# ---------------------------------------------------------------------------------------------
# DeepSpeed's launcher over ssh (pdsh)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """sshd on a free loopback port with a host key and a client key made here. Returns a
    directory holding an `ssh` that uses them (put it first on PATH: DeepSpeed's ssh check and
    pdsh both run `ssh`)."""
    reason = missing(["/usr/sbin/sshd", "ssh", "ssh-keygen", "pdsh"])
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / key)], check=True)
    (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
    port = free_port()
    (base / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base / 'host_key'}\n"
        f"AuthorizedKeysFile {base / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {base / 'sshd.pid'}\n"
    )
    (base / "ssh_config").write_text(
        "Host localhost 127.0.0.1\n"
        f"  Port {port}\n  IdentityFile {base / 'client_key'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
    )
    bin_dir = base / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {base / "ssh_config"} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    daemon = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(base / "sshd_config")],
                              stdout=subprocess.DEVNULL, stderr=open(base / "sshd.log", "w"))
    probe = [str(bin_dir / "ssh"), "127.0.0.1", "true"]
    try:
        wait_for(lambda: subprocess.run(probe, capture_output=True).returncode == 0, "sshd to accept the key", 30)
        yield bin_dir
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def test_deepspeed_launcher_over_ssh(tmp_path, reference, sshd):
    """launch/deepspeed.sh with a hostfile of two entries that are both this machine: DeepSpeed
    reaches each over ssh (pdsh), one process per host, and trains the reference's reranker."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    ds_env = tmp_path / "ds_env"
    ds_env.write_text("DS_ACCELERATOR=cpu\n")  # DeepSpeed forwards only a few variables by itself
    out = tmp_path / "run"
    env = job_env(PATH=f"{sshd}:{os.environ['PATH']}", DS_ENV_FILE=str(ds_env))
    [log] = run_launches([
        ["bash", "launch/deepspeed.sh", "--hostfile", str(hostfile), "--master-port", str(free_port()),
         "--cpus-per-node", "1", "--", *trainer_args(out)]
    ], env)
    assert "pdsh" in log  # the multi-node path ran, not a local launch
    assert logged_steps(out) == list(range(1, MAX_STEPS + 1))
    assert_same_reranker(out, reference)


# ---------------------------------------------------------------------------------------------
# Slurm: a one-node cluster on localhost
# ---------------------------------------------------------------------------------------------

SLURM_BINARIES = ["munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue"]
# What a CPU site passes instead of editing the template (no GPUs to request, fewer cores).
CPU_SBATCH = ["--gpus-per-node=0", "--cpus-per-task=2"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Slurm:
    conf: Path
    base: Path

    def env(self, **extra: str) -> dict[str, str]:
        return job_env(SLURM_CONF=str(self.conf), GRERANK_NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), **extra)

    def run(self, *command: str) -> str:
        return checked(subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=60)).stdout

    def submit(self, template: str, log: Path, *args: str) -> str:
        """sbatch from the repository root, as a user does; returns the job id."""
        result = checked(subprocess.run(
            ["sbatch", "--parsable", *CPU_SBATCH, f"--output={log}", f"launch/slurm/{template}", *args],
            cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=60,
        ))
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        fields = self.run("scontrol", "show", "job", "-o", job_id).split()
        return dict(field.split("=", 1) for field in fields if "=" in field)

    def wait_done(self, job_id: str, restarts: int) -> dict[str, str]:
        """Wait until the job has ended after `restarts` requeues."""
        def done() -> bool:
            info = self.job(job_id)
            return info["JobState"] in ENDED and int(info["Restarts"]) == restarts

        wait_for(done, f"job {job_id} to end after {restarts} requeue(s)", every=0.5)
        return self.job(job_id)

    def wait_training(self, job_id: str, log: Path, condition: Callable[[], bool], what: str) -> None:
        """Wait for `condition` (checked often: the test signals the job as soon as it holds)
        while the job runs; fail at once, with its log, if it ends first (checked each second)."""
        checked_at = time.monotonic()

        def reached() -> bool:
            nonlocal checked_at
            if condition():
                return True
            if time.monotonic() - checked_at > 1:
                checked_at = time.monotonic()
                state = self.job(job_id)["JobState"]
                assert state not in ENDED, f"job {job_id} ended ({state}) before {what}:\n{log.read_text()[-6000:]}"
            return False

        wait_for(reached, what, every=0.1)

    def stop_all_jobs(self) -> None:
        """Cancel whatever is left and wait until no job holds the node (its slurmstepd
        processes exit with it; stopping slurmd alone would leave them behind)."""
        env = self.env()
        subprocess.run(["scancel", "--full", "--partition=local"], env=env, capture_output=True, timeout=60)

        def idle() -> bool:
            queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=60)
            return queue.returncode == 0 and not queue.stdout.strip()

        wait_for(idle, "the cancelled jobs to leave the node", 120, every=0.5)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd in the foreground of this test session, on free ports, with
    every file under a temporary directory; one node (this host, 2 CPUs, no GPUs)."""
    reason = missing(SLURM_BINARIES)
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    base.chmod(0o755)  # munged wants its socket directory searchable by everyone
    key = base / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = base / "munge.sock"
    host = socket.gethostname().split(".")[0]
    conf = base / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=grerank",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # A requeued job waits until the credentials of its last run have expired (120 s by
        # default) before it starts again: a run started sooner is refused ("Job credential
        # revoked"). Ten seconds are enough for steps that start at once on this machine.
        f"AuthInfo=socket={socket_path},cred_expire=10",
        f"StateSaveLocation={base / 'state'}",
        f"SlurmdSpoolDir={base / 'spool'}",
        f"SlurmctldPidFile={base / 'slurmctld.pid'}",
        f"SlurmdPidFile={base / 'slurmd.pid'}",
        f"SlurmctldLogFile={base / 'slurmctld.log'}",
        f"SlurmdLogFile={base / 'slurmd.log'}",
        # linuxproc follows the process tree, as cgroup does on a real cluster: a step signal
        # reaches torchrun's workers too (they run in sessions of their own).
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "SchedulerType=sched/builtin",
        # A released job starts within a second, not at the next minute's scheduling pass.
        "SchedulerParameters=sched_interval=1",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "ReturnToService=2",
        "MinJobAge=600",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN",
        f"PartitionName=local Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    for directory in ("state", "spool"):
        (base / directory).mkdir()
    env = job_env(SLURM_CONF=str(conf))
    daemons = []
    cluster = Slurm(conf, base)
    try:
        daemons.append(subprocess.Popen(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
             f"--pid-file={base / 'munged.pid'}", f"--log-file={base / 'munged.log'}", f"--seed-file={base / 'munged.seed'}"],
        ))
        wait_for(socket_path.exists, "munged's socket", 30)
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL))
        daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL))

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            return out.strip() == "idle"

        wait_for(node_idle, "the Slurm node to come up idle", 60)
        yield cluster
    finally:
        try:
            if len(daemons) == 3:
                cluster.stop_all_jobs()
        finally:
            for daemon in reversed(daemons):
                daemon.terminate()
                daemon.wait(timeout=60)


def test_slurm_eval_scores_are_the_rerankers_forward(tmp_path, reference, slurm):
    """eval.sbatch on the reference's reranker, submitted for real: the job ends COMPLETED with
    exit 0, every query is evaluated once, and the reranker scores are the exported model's own
    forward."""
    eval_out = tmp_path / "eval"
    eval_log = tmp_path / "eval.log"
    job = slurm.wait_done(slurm.submit(
        "eval.sbatch", eval_log, "--config", str(CONFIG), "--reranker", str(reference / "reranker"),
        "--setting", "reranker", "--data", str(EVAL_FILE), "--out", str(eval_out),
    ), restarts=0)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), eval_log.read_text()[-6000:]
    assert f"# slurm job {job['JobId']} (restart 0): 1 node(s)" in eval_log.read_text()
    records = [json.loads(line) for line in EVAL_FILE.read_text().splitlines()]
    predictions = [json.loads(line) for line in (eval_out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in predictions) == sorted(r["id"] for r in records)  # each query once
    model = AutoModelForSequenceClassification.from_pretrained(reference / "reranker").eval()
    tokenizer = AutoTokenizer.from_pretrained(reference / "reranker")
    config = load_config(CONFIG)
    by_id = {r["id"]: r for r in records}
    for prediction in predictions[:8]:
        record = by_id[prediction["id"]]
        passages = [config.data.passage_template.format(title=c["title"], text=c["text"]) for c in record["ctxs"]]
        inputs = tokenizer([record["question"]] * len(passages), passages, truncation=True,
                           max_length=config.reranker.max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            want = model(**inputs).logits[:, 0]
        got = torch.tensor(prediction["methods"]["reranker"]["scores"])
        assert torch.allclose(got, want, atol=1e-4), prediction["id"]


def resumed_steps(log: Path) -> list[int]:
    """The step of every `resumed from ... at step N` line in the job's log, in order."""
    return [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines() if line.startswith("resumed from")]


def test_slurm_train_preempted_and_time_limited_resumes_exactly(tmp_path, reference, slurm):
    """One train.sbatch job, interrupted the two ways Slurm stops a job early, ends with the
    uninterrupted run's weights:
    1. preemption: `scancel --signal=USR1` reaches the step's processes; the trainers finish their
       step, checkpoint and exit, the job completes; `scontrol requeue` brings it back and it
       continues from that checkpoint (--resume auto);
    2. time limit: the template's `--signal=B:USR1@600` sends SIGUSR1 to the batch shell alone
       (here at once, with `scancel --batch`), which has srun pass it to the trainers, waits for
       their checkpoint and requeues the job itself; the job comes back and continues again.
    With no periodic checkpoint (save_every=0), only the checkpoints the signals made exist."""
    template = (ROOT / "launch" / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@" in template and "#SBATCH --requeue" in template
    out = tmp_path / "run"
    log = tmp_path / "train.log"
    ckpt = out / "checkpoints"
    job_id = slurm.submit("train.sbatch", log, *trainer_args(out))

    # 1. a step signal, then a requeue from outside
    slurm.wait_training(job_id, log, lambda: len(logged_steps(out)) >= 2, "the first two steps")
    slurm.run("scancel", "--signal=USR1", job_id)
    job = slurm.wait_done(job_id, restarts=0)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-6000:]
    first_stop = logged_steps(out)[-1]
    assert first_stop < MAX_STEPS, "the step signal came after the last step"
    assert (ckpt / "latest").read_text() == f"step_{first_stop}"  # the signal's checkpoint
    slurm.run("scontrol", "requeue", job_id)

    # 2. once it trains again: the time-limit signal to the batch shell
    slurm.wait_training(job_id, log, lambda: resumed_steps(log) == [first_stop] and logged_steps(out)[-1] > first_stop,
                        "a step after the first resume")
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    job = slurm.wait_done(job_id, restarts=2)
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), text[-6000:]
    assert f"# time limit near: requeueing job {job_id} (srun exited with 0)" in text, text[-6000:]
    for restart in range(3):
        assert f"# slurm job {job_id} (restart {restart}): 1 node(s)" in text
    first, second = resumed_steps(log)
    assert first == first_stop and first < second < MAX_STEPS, (first_stop, first, second)
    assert f"resumed from {ckpt / f'step_{second}'} at step {second}" in text
    assert "exported reranker to" in text and (ckpt / "latest").read_text() == f"step_{MAX_STEPS}"
    assert logged_steps(out) == list(range(1, MAX_STEPS + 1))  # every step once: none lost, none redone
    assert_same_reranker(out, reference)
