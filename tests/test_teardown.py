"""Every entry point releases the process group it started.

A gloo group left alive until exit is torn down by static destructors, and a rank can abort
(SIGABRT) after its work succeeded: one CI run in three failed so. These tests run a command
through the real `grerank` dispatcher, in process, and check the group is gone afterwards, on the
success path and on the error path.
"""

from __future__ import annotations

import argparse
import socket
import sys
import types

import pytest
import torch.distributed as dist

from grerank_dist import cli


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def command_starting_a_group(monkeypatch: pytest.MonkeyPatch):
    """A stand-in subcommand whose run() starts a 1-rank gloo group, then returns or raises."""
    module = types.ModuleType("grerank_test_command")
    seen: dict[str, bool] = {}

    def configure_parser(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fail", action="store_true")

    def run(args: argparse.Namespace) -> int:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        seen["initialized"] = dist.is_initialized()
        if args.fail:
            raise RuntimeError("the command failed")
        return 0

    module.configure_parser, module.run = configure_parser, run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "group-test", (module.__name__, "starts a process group"))
    yield seen
    if dist.is_initialized():  # leave no group behind for later tests, whatever happened
        dist.destroy_process_group()


def test_a_command_that_started_a_process_group_destroys_it(command_starting_a_group):
    assert cli.main(["group-test"]) == 0
    assert command_starting_a_group["initialized"]
    assert not dist.is_initialized()


def test_a_failing_command_still_destroys_its_process_group(command_starting_a_group):
    with pytest.raises(RuntimeError, match="the command failed"):
        cli.main(["group-test", "--fail"])
    assert command_starting_a_group["initialized"]
    assert not dist.is_initialized()
