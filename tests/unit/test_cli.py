# SPDX-License-Identifier: Apache-2.0
"""The CLI as a user sees it: exit codes and one-line errors (click's CliRunner)."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from xdplb import cli

COMMANDS = [["build"], ["attach"], ["detach"], ["status"], ["trace"], ["demo"], ["lab"], ["lab", "up"],
            ["lab", "down"], ["lab", "status"], ["service"], ["service", "add"], ["service", "del"],
            ["service", "list"], ["backend"], ["backend", "add"], ["backend", "set"], ["backend", "del"],
            ["backend", "list"], ["stats"], ["apply"], ["export"], ["upgrade"], ["serve"]]


def test_every_command_is_in_the_list():
    def walk(group, prefix):
        for name, cmd in group.commands.items():
            yield prefix + [name]
            if hasattr(cmd, "commands"):
                yield from walk(cmd, prefix + [name])
    assert sorted(walk(cli.main, [])) == sorted(COMMANDS)


def test_shell_completion_script_is_offered(monkeypatch):
    monkeypatch.setenv("_XDPLB_COMPLETE", "bash_source")
    result = CliRunner().invoke(cli.main, [], prog_name="xdplb")
    assert "_XDPLB_COMPLETE=bash_complete" in result.output


def run(*args, **kw):
    return CliRunner().invoke(cli.main, list(args), **kw)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output


def test_attach_without_backends_is_a_usage_error():
    result = run("attach", "eth0")
    assert result.exit_code == 2
    assert "Missing option '--backends'" in result.output


@pytest.mark.parametrize("args,message", [
    (["--backends", "10.0.0.300"], "bad backend '10.0.0.300'"),
    (["--backends", "10.0.0.1", "--port", "http"], "bad port 'http'"),
    (["--backends", "10.0.0.1", "--vip", "nope..x"], "bad VIP 'nope..x'"),
    (["--backends", "10.0.0.1", "--clients", "10.0.0.0/40"], "bad client network"),
    (["--backends", "10.0.0.1", "--snat-ports", "100-110"], "too small"),
])
def test_bad_attach_input_exits_2_with_one_line(monkeypatch, args, message):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("xdplb.namespaces.join_host_mounts", lambda: None)
    result = run("attach", "eth0", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["attach", "lo", "--backends", "10.0.0.1"], ["detach", "lo"],
                                     ["status"]], ids=" ".join)
def test_not_root_says_so(monkeypatch, command):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr("xdplb.namespaces.join_host_mounts", lambda: None)
    result = run(*command)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: xdplb needs root (CAP_BPF and CAP_NET_ADMIN) for this; run it with sudo"]


def test_missing_clang_names_the_package(monkeypatch):
    monkeypatch.setenv("CLANG", "clang-that-does-not-exist")
    result = run("build")
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: clang-that-does-not-exist not found; install it with: "
                                     "apt-get install clang llvm")


def test_unknown_netns_is_a_usage_error(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    result = run("-n", "xdplb-no-such-ns", "status")
    assert result.exit_code == 2
    assert "no network namespace named 'xdplb-no-such-ns'" in result.output


def test_lab_rejects_foreign_prefix_and_counts():
    result = run("lab", "up", "--prefix", "mylab")
    assert result.exit_code == 2 and "must start with 'xdplb'" in result.output
    result = run("lab", "up", "--backends", "0")
    assert result.exit_code == 2 and "give 1 to 26" in result.output
