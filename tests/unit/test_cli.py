# SPDX-License-Identifier: Apache-2.0
"""The CLI as a user sees it: exit codes and one-line errors (click's CliRunner)."""
from __future__ import annotations

import ipaddress

import pytest
from click.testing import CliRunner

from xdplb import cli

COMMANDS = [["build"], ["attach"], ["detach"], ["status"], ["trace"], ["demo"], ["lab"], ["lab", "up"],
            ["lab", "down"], ["lab", "status"], ["service"], ["service", "add"], ["service", "del"],
            ["service", "list"], ["backend"], ["backend", "add"], ["backend", "set"], ["backend", "del"],
            ["backend", "list"], ["stats"], ["flows"], ["apply"], ["check"], ["export"], ["upgrade"], ["serve"],
            ["decap"], ["decap", "attach"], ["decap", "detach"], ["decap", "status"]]


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
    (["--backends", "10.0.0.1", "--not-allowed", "pass"], "--not-allowed pass needs an allow-list: add --clients"),
])
def test_bad_attach_input_exits_2_with_one_line(monkeypatch, args, message):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("xdplb.namespaces.join_host_mounts", lambda: None)
    result = run("attach", "eth0", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["attach", "lo", "--backends", "10.0.0.1"], ["detach", "lo"],
                                     ["status"], ["decap", "attach", "eth0"], ["decap", "detach", "eth0"],
                                     ["decap", "status"]], ids=" ".join)
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


# ---- input that used to be accepted silently (issue 13) ----------------------------------

class FakeDataPlane:
    def __init__(self, abi_version=None, slots=1 << 22, snat=(10000, 32767)):
        from xdplb import abi
        self.abi_version = abi.ABI_VERSION if abi_version is None else abi_version
        self.slots, self.snat, self.closed = slots, snat, False

    def read_abi_version(self):
        return self.abi_version

    def read_settings(self):
        from xdplb.model import Settings
        return Settings(snat_addrs=[], snat_port_min=self.snat[0], snat_port_max=self.snat[1])

    def flow_slot_count(self):
        return self.slots

    def flow_capacity(self):
        return self.slots // 4

    def close(self):
        self.closed = True


@pytest.fixture
def as_root(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("xdplb.namespaces.join_host_mounts", lambda: None)


def attached(monkeypatch, dataplane):
    """loader.find finds xdplb on the interface with this data plane; control.attach is
    not reached unless the options pass, and then records that it was."""
    from types import SimpleNamespace
    reached = []
    monkeypatch.setattr("xdplb.loader.find", lambda ifname: dataplane and SimpleNamespace(dataplane=dataplane))
    monkeypatch.setattr("xdplb.control.attach", lambda req: reached.append(req) or (_ for _ in ()).throw(
        cli.XdplbError("reached control.attach")))
    return reached


@pytest.mark.parametrize("args,message", [
    (["--backends", "10.0.0.1", "--vip", "127.1"],
     "Error: bad VIP '127.1': write the IPv4 address in full, as four decimal numbers (this shorthand means "
     "127.0.0.1)"),
    (["--backends", "10"],
     "Error: bad backend '10': write the IPv4 address in full, as four decimal numbers (this shorthand means "
     "0.0.0.10)"),
    (["--backends", "10.0.0.1", "--clients", "10.0.0.0/8,192.168.1.7/24"],
     "Error: bad client network '192.168.1.7/24': it has host bits set; write the network, 192.168.1.0/24"),
    (["--backends", "10.0.0.1", "--port", "20000", "--snat-ports", "10000-32767"],
     "Error: --port 20000 is inside --snat-ports 10000-32767, where the backends' replies arrive: give a port "
     "outside 10000-32767, or --snat-ports LOW-HIGH without it"),
])
def test_attach_refuses_what_it_used_to_take_silently(as_root, monkeypatch, args, message):
    reached = attached(monkeypatch, None)
    result = run("attach", "eth0", *args)
    assert (result.exit_code, result.output.strip().splitlines()) == (2, [message])
    assert not reached


def _wanted(port=80, flows=None, snat_ports=None):
    from xdplb.model import Backend, InterfaceConfig, Service
    w = InterfaceConfig("eth0", services=[Service(ipaddress.IPv4Address("10.0.0.2"), port, "tcp",
                                                  [Backend(ipaddress.IPv4Address("10.0.0.1"), 80)])])
    if flows:
        w.flows = flows
    if snat_ports:
        w.snat_ports = snat_ports
    return w


def test_a_service_port_among_the_default_or_running_snat_ports_is_refused():
    """converge checks the wanted state (the options merged over the running one) before
    any write: the default range, a running one, or a given one."""
    from types import SimpleNamespace
    from xdplb import control, loader
    link = SimpleNamespace(up=True)
    assert control.problems(_wanted(port=10000), None, link) == [
        "eth0: service 10.0.0.2:10000/tcp: port 10000 is inside the SNAT ports 10000-32767, where the backends' "
        "replies arrive: give the service a port outside 10000-32767, or other SNAT ports (--snat-ports / "
        "snat_ports)"]
    running = loader.Attachment(link, 7, "generic", FakeDataPlane(slots=1 << 22))
    assert "port 40000 is inside the SNAT ports 40000-50000" in \
        control.problems(_wanted(port=40000, snat_ports=(40000, 50000)), running, link)[0]
    assert control.problems(_wanted(port=40000, snat_ports=(50000, 60000)), running, link) == []


def test_flows_on_an_attached_interface_must_be_its_capacity():
    from types import SimpleNamespace
    from xdplb import control, loader
    link = SimpleNamespace(up=True)
    running = loader.Attachment(link, 7, "generic", FakeDataPlane(slots=1 << 18))  # 65536 flows
    assert control.problems(_wanted(flows=4096), running, link) == [
        "eth0.flows: the running flow table holds 65536 flows; resizing needs xdplb detach eth0 (which drops "
        "established flows)"]
    assert control.problems(_wanted(flows=65536), running, link) == []


@pytest.mark.parametrize("metrics,message", [
    ("127.0.0.1:99999", "the port must be a number from 1 to 65535, like 127.0.0.1:9433, [::1]:9433 or "
                        "localhost:9433"),
    ("127.0.0.1:0", "the port must be a number from 1 to 65535"),
    ("9433", "give HOST:PORT, like 127.0.0.1:9433"),
    ("::1:9433", "put an IPv6 address in brackets, as [::1]:9433"),
    ("127.1:9433", "'127.1' is neither an IPv4 address in full (four decimal numbers) nor a host name"),
    ("bad_host:9433", "'bad_host' is neither an IPv4 address in full"),
])
def test_serve_checks_the_metrics_address_first(as_root, tmp_path, metrics, message):
    result = run("serve", str(tmp_path / "lb.toml"), "--metrics", metrics)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: bad --metrics {metrics!r}: {message}")


def test_serve_refuses_to_take_over_a_data_plane_of_another_abi_in_one_line(as_root, monkeypatch, tmp_path):
    from xdplb import abi
    path = tmp_path / "lb.toml"
    path.write_text('[interfaces.eth0]\n[[interfaces.eth0.services]]\nvip = "10.0.0.2"\nport = 80\n'
                    'backends = [ { address = "10.0.0.11" } ]\n')
    dataplane = FakeDataPlane(abi_version=abi.ABI_VERSION - 1)
    attached(monkeypatch, dataplane)
    monkeypatch.setattr("xdplb.namespaces.netns_name", lambda: "lb")
    monkeypatch.setattr("xdplb.loader.upgrade", lambda found: pytest.fail("must not try to upgrade"))
    result = run("serve", str(path), "--metrics", "127.0.0.1:19999")
    assert (result.exit_code, result.output.strip().splitlines()) == (1, [
        f"Error: eth0 runs an xdplb data plane of ABI {abi.ABI_VERSION - 1} and this xdplb speaks ABI "
        f"{abi.ABI_VERSION}: its state cannot be taken over, by serve or by xdplb upgrade; detach it "
        "(xdplb -n lb detach eth0, which drops its flows) and start serve again: it attaches anew"])
    assert dataplane.closed


def test_the_cli_starts_without_threads():
    """`ip netns exec NS xdplb` joins the host's mount namespace first (setns), which a
    process with threads cannot do: nothing the CLI imports at start may start any (numpy
    does, so it is imported only where the flow table is read)."""
    import subprocess
    import sys
    code = "import sys, xdplb.cli, xdplb.serve, xdplb.control, xdplb.report; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_version_names_package_abi_libbpf_and_kernel():
    import platform

    from xdplb import __version__, abi
    from xdplb.libbpf import libbpf
    result = CliRunner().invoke(cli.main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"xdplb {__version__}", f"ABI {abi.ABI_VERSION}", f"libbpf {libbpf().version} ({libbpf().path})",
        f"kernel {platform.release()}", f"python {platform.python_version()}"]


def test_check_reports_every_problem_without_applying(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[interfaces.eth0]\n[[interfaces.eth0.services]]\nvip = "10.0.0.2"\nport = 80\n'
                    'backends = [ { address = "10.0.0.11" }, { address = "10.0.0.12", weight = 2 } ]\n')
    bad.write_text('[interfaces.eth0]\nflows = "x"\n[[interfaces.eth0.services]]\nvip = "fd00::1"\nport = 80\n'
                   'backends = [ { address = "fd00::2" } ]\n')
    result = CliRunner().invoke(cli.main, ["check", str(good)])
    assert (result.exit_code, result.output) == (0, f"{good}: ok (1 interface, 1 service)\n")
    result = CliRunner().invoke(cli.main, ["check", str(bad)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {bad}: 2 problems:",
        "  interfaces.eth0.flows: must be a whole number from 1024 to 4194304, not 'x'",
        "  interfaces.eth0: service [fd00::1]:80/tcp: IPv6 services forward with --forward dsr or ipip only so "
        "far (nat is IPv4 only): give --forward dsr or ipip, or an IPv4 VIP"]
