"""Work out which hosts and devices DeepSpeed's launcher will use for a given command line.

launch/deepspeed.sh calls this with the exact arguments it passes to ``deepspeed`` (the
``deepspeed.launcher.runner`` module) to pick a default master address and thread count, and to
print, for ``--dry-run``, what runs on every node. It resolves the hostfile and the
``--include/--exclude/--num_nodes/--num_gpus`` filters with DeepSpeed's own functions, so the
plan follows the installed DeepSpeed instead of a copy of its rules.

Usage:
    python launch/deepspeed_plan.py RUNNER_ARGS...

prints "MASTER_HOST MAX_SLOTS NUM_NODES" on its first line, then one block per node: a comment
with the node's host, devices and global ranks, and the launch command DeepSpeed starts there.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import shlex
import sys

# DeepSpeed's logger writes to the stdout it sees when first imported; this script's stdout is
# parsed by launch/deepspeed.sh, so DeepSpeed is imported with stdout pointing at stderr.
with contextlib.redirect_stdout(sys.stderr):
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher import runner
# Its notes ("Unable to find hostfile ...") describe a launch, not this look-up.
runner.logger.setLevel(logging.ERROR)

LOCAL_MASTER_ADDR = "127.0.0.1"


def active_resources(args: argparse.Namespace) -> collections.OrderedDict[str, list[int]]:
    """Host -> device slots, resolved the way ``deepspeed.launcher.runner.main`` does it."""
    pool = runner.fetch_hostfile(args.hostfile)
    if not pool:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        uses_filters = args.include or args.exclude or args.num_nodes > 1 or args.num_gpus > 0
        if visible and not uses_filters:
            args.include = f"localhost:{visible}"
        pool = {"localhost": get_accelerator().device_count()}
    resources = runner.parse_inclusion_exclusion(pool, args.include, args.exclude)
    return runner.apply_num_nodes_and_gpus(resources, args.num_nodes, args.num_gpus)


def runs_locally(args: argparse.Namespace, resources: dict[str, list[int]]) -> bool:
    """DeepSpeed skips pdsh/ssh when one host is left (unless forced) or with --no_ssh."""
    return (not args.force_multi and len(resources) == 1) or args.no_ssh


def master_host(args: argparse.Namespace, resources: dict[str, list[int]]) -> str:
    """The address rank 0 listens on: the one given, else the first host in use."""
    if not runner.fetch_hostfile(args.hostfile):
        return LOCAL_MASTER_ADDR  # DeepSpeed forces this address for hostfile-less runs
    return args.master_addr or next(iter(resources))


def describe(args: argparse.Namespace, resources: dict[str, list[int]]) -> None:
    """Print each node's rank block and the per-node launch command DeepSpeed starts there."""
    world_info = runner.encode_world_info(resources)
    world_size = sum(len(slots) for slots in resources.values())
    master = master_host(args, resources)
    local = runs_locally(args, resources)
    print(
        f"# deepspeed plan: {len(resources)} node(s), world size {world_size}, "
        f"master {master}:{args.master_port}, {'local launch' if local else 'started over ' + args.launcher}"
    )
    first_rank = 0
    for node_rank, (host, slots) in enumerate(resources.items()):
        last_rank = first_rank + len(slots) - 1
        devices = ",".join(str(slot) for slot in slots)
        print(
            f"# node {node_rank} of {len(resources)} (host {host}, devices {devices}): "
            f"global ranks {first_rank}-{last_rank}, world size {world_size}"
        )
        command = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}"]
        if not local:
            command.append(f"--node_rank={node_rank}")
        command += [f"--master_addr={master}", f"--master_port={args.master_port}"]
        command += [flag for flag, wanted in (("--module", args.module), ("--no_local_rank", args.no_local_rank)) if wanted]
        command += [args.user_script, *args.user_args]
        prefix = "" if local else f"cd {shlex.quote(os.getcwd())} && "
        print(prefix + shlex.join(command))
        first_rank = last_rank + 1


def main(argv: list[str]) -> int:
    args = runner.parse_args(argv)
    try:
        resources = active_resources(args)
    except ValueError as error:  # DeepSpeed's message names the bad hostfile line or filter
        print(f"deepspeed_plan: {error}", file=sys.stderr)
        return 2
    if not resources:
        print("deepspeed_plan: no host or device is left after the hostfile and filters", file=sys.stderr)
        return 2
    max_slots = max(len(slots) for slots in resources.values())
    print(master_host(args, resources), max_slots, len(resources))
    describe(args, resources)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
