# SPDX-License-Identifier: Apache-2.0
"""The xdplb command line: parse options, call control (and lab, build), print."""
from __future__ import annotations

import ipaddress
import json
import signal
import sys
import time

import click

from . import backendhost, build as build_mod, decap as decap_mod
from . import config as config_mod, control, lab as lab_mod, model, namespaces, netlink, report, trace as trace_mod
from .errors import UsageError, XdplbError


# apply --dry-run: the file differs from the running state (0: it matches; 1 and 2 are
# errors, as for every command).
EXIT_CHANGES_PENDING = 3


class Group(click.Group):
    """Turns library errors into one-line click errors (a traceback only with --debug),
    and prints every error, usage mistakes included, as one line."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.UsageError(str(exc)) from None  # the message already names the fix
        except XdplbError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(str(exc)) from None


def _print_version(ctx, param, value) -> None:
    """--version: what a bug report needs, each part found without root."""
    if not value or ctx.resilient_parsing:
        return
    v = report.versions()
    libbpf_text = f"{v['libbpf']} ({v['libbpf_path']})" if v["libbpf_path"] else v["libbpf"]
    click.echo(f"xdplb {v['version']}\nABI {v['abi']}\nlibbpf {libbpf_text}\nkernel {v['kernel']}\n"
               f"python {v['python']}")
    ctx.exit()


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the versions of xdplb, its data plane ABI, libbpf and the kernel, and exit.")
@click.option("-n", "--netns", metavar="NETNS", help="Work in this network namespace (like ip -n).")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.pass_context
def main(ctx, netns, debug):
    """xdplb: an XDP L4 load balancer.

    \b
    Example:
      xdplb build
      xdplb attach eth0 --backends 10.0.0.11,10.0.0.12
      xdplb trace eth0
      xdplb detach eth0
    """
    ctx.ensure_object(dict)
    ctx.obj.update(netns=netns, debug=debug)


def complete_iface(ctx, param, incomplete):
    """Shell completion of interface names (of the -n namespace when given)."""
    from click.shell_completion import CompletionItem
    try:
        netns = ctx.find_root().params.get("netns")
        names = netlink.link_names(netns)
    except Exception:  # completion must never fail loudly
        return []
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def _enter(ctx) -> None:
    """Moves into the requested network namespace, keeping the host's bpffs in view."""
    netns = ctx.obj.get("netns")
    if netns:
        control.ensure_root()
        namespaces.enter_netns(netns)
    namespaces.join_host_mounts()


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@main.command()
def build():
    """Compile bpf/ into build/xdplb.bpf.o (the balancer) and build/decap.bpf.o (the
    backends' decapsulator) and check both objects; build the control plane's native
    Maglev fill (build/libxdplb_maglev.so).

    \b
    Example:
      xdplb build
    """
    objects, native = build_mod.compile_all()
    click.echo(f"libbpf headers: {objects[0].libbpf_headers}")
    for obj in objects:
        click.echo(f"built {obj.path} ({obj.size} bytes, {obj.instructions} instructions)")
        click.echo(f"  licence: {obj.license}; BTF: {'yes' if obj.btf else 'no'}")
        click.echo(f"  maps: {', '.join(obj.maps)}")
    click.echo(f"built {native} (the control plane's Maglev fill)")


@main.command()
@click.argument("iface", shell_complete=complete_iface)
@click.option("--backends", "-b", required=True, metavar="ADDR[:PORT][=WEIGHT],...",
              help="Backends, as addresses or host names; PORT defaults to --port, WEIGHT to 1 "
                   "(0: no new flows).")
@click.option("--vip", metavar="ADDR", help="Service address [default: the interface's primary IPv4].")
@click.option("--port", default="80", show_default=True, help="Service port.")
@click.option("--proto", default="tcp", show_default=True, type=click.Choice(["tcp", "udp"]))
@click.option("--mode", default="auto", show_default=True, type=click.Choice(["auto", "native", "generic"]),
              help="XDP mode; auto prefers native and falls back to generic.")
@click.option("--clients", metavar="CIDR,...", help="Only these clients may use the service [default: all].")
@click.option("--not-allowed", type=click.Choice(["drop", "pass"]), default="drop", show_default=True,
              help="What happens to clients outside --clients: dropped and counted, or passed to the kernel.")
@click.option("--snat", metavar="ADDR[,ADDR...]",
              help="Source addresses towards backends, up to 16, used in turn (each adds a port "
                   "range of tuples per backend) [default: the interface's primary IPv4].")
@click.option("--snat-ports", metavar="LOW-HIGH", help="Source ports towards backends [default: 10000-32767].")
@click.option("--flows", type=click.IntRange(1024, model.FLOWS_MAX),
              help=f"Flow table capacity (connections); memory is reserved up front [default: {model.FLOWS_DEFAULT}, "
                   "or the running table's].")
@click.option("--seed", type=click.IntRange(0, 0xFFFFFFFF), help="Hash seed; the same on every node of a cluster.")
@click.option("--forward", type=click.Choice(model.FORWARD_MODES), default="nat", show_default=True,
              help="How packets reach the backends: full NAT, direct server return (backends on this "
                   "segment, VIP on their lo) or IPIP encapsulation (backends decapsulate: xdplb decap).")
@click.option("--encap-source", metavar="ADDR[,ADDR]",
              help="Outer source of IPIP packets, one per family [default: the first SNAT address; for IPv6 "
                   "services, the interface's first global IPv6 address].")
@click.option("--force", is_flag=True, help="Replace an XDP program that is not xdplb's.")
@click.pass_context
def attach(ctx, iface, backends, vip, port, proto, mode, clients, not_allowed, snat, snat_ports, flows, seed,
           forward, encap_source, force):
    """Balance VIP:PORT arriving on IFACE over the backends (full NAT).

    Running it again with other backends updates the running program in place:
    established connections stay on their backends.

    \b
    Example:
      xdplb attach eth0 --backends 10.0.0.11,10.0.0.12
      xdplb -n xdplb-lb attach eth0 --backends 10.42.0.101,10.42.0.102 --port 80
    """
    _enter(ctx)
    port_n = model.parse_port(port)
    req = control.AttachRequest(
        ifname=iface, backends=model.parse_backends(backends, port_n),
        vip=model.parse_address(vip, "VIP") if vip else None, port=port_n, proto=proto, mode=mode,
        clients=model.parse_networks(clients) if clients else [], not_allowed=not_allowed, force=force,
        snat_addrs=model.parse_snat_addresses(snat) if snat else None,
        snat_ports=model.parse_port_range(snat_ports) if snat_ports else None, flows=flows, seed=seed,
        forward=forward, encap_sources=model.parse_encap_sources(encap_source) if encap_source else (None, None))
    _check_attach_options(req)
    outcome, svc = control.attach(req)
    for note in outcome.notes:
        click.echo(note)
    verb = "attached to" if outcome.loaded else "updated on"
    click.echo(f"xdplb {verb} {iface} (program {outcome.program_id}, {outcome.mode} mode): "
               f"{svc.name} -> {', '.join(b.endpoint for b in svc.backends)}")


def _check_attach_options(req: control.AttachRequest) -> None:
    """A service port among the given SNAT ports is refused before anything else,
    in the words of the options (converge refuses the running or default range too)."""
    if req.snat_ports and req.snat_ports[0] <= req.port <= req.snat_ports[1]:
        lo, hi = req.snat_ports
        raise UsageError(f"--port {req.port} is inside --snat-ports {lo}-{hi}, where the backends' replies "
                         f"arrive: give a port outside {lo}-{hi}, or --snat-ports LOW-HIGH without it")


@main.command()
@click.argument("iface", shell_complete=complete_iface)
@click.option("--force", is_flag=True, help="Also remove an XDP program that is not xdplb's.")
@click.pass_context
def detach(ctx, iface, force):
    """Remove xdplb from IFACE and delete its pins.

    \b
    Example:
      xdplb detach eth0
    """
    _enter(ctx)
    click.echo(control.detach(iface, force))


def _print_status(entry: dict) -> None:
    if entry["program_id"] is None:
        click.echo(f"{entry['interface']}: xdplb is not attached")
        return
    click.echo(f"{entry['interface']}: xdplb program {entry['program_id']}, {entry['mode']} mode, "
               f"SNAT {','.join(entry['snat']['addresses'])} ports {entry['snat']['ports']}"
               f"{', tracing' if entry['trace'] else ''}")
    for s in entry["services"]:
        click.echo(f"  service {s['name']} {s['forward']} (clients: {', '.join(s['clients'])}): "
                   f"{s['packets']} packets, {s['bytes']} bytes, {s['new_flows']} flows")
        for b in s["backends"]:
            click.echo(f"    backend {b['endpoint']} weight {b['weight']}: "
                       f"{b['packets']} packets, {b['bytes']} bytes, {b['new_flows']} flows")
    nonzero = {k: v for k, v in entry["counters"].items() if v}
    click.echo("  counters: " + (", ".join(f"{k} {v}" for k, v in nonzero.items()) or "none yet"))


@main.command()
@click.argument("iface", required=False, shell_complete=complete_iface)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx, iface, as_json):
    """Show where xdplb is attached, its services, backends and counters.

    \b
    Example:
      xdplb status
      xdplb -n xdplb-lb status eth0 --json
    """
    _enter(ctx)
    entries = report.status(iface)
    if as_json:
        _echo_json(entries)
        return
    if not entries:
        click.echo("xdplb is not attached to any interface here")
    for entry in entries:
        _print_status(entry)


@main.command()
@click.argument("iface", required=False, shell_complete=complete_iface)
@click.option("--raw", is_flag=True, help="Print trace_pipe lines undecoded.")
@click.option("--duration", type=float, metavar="SECONDS", help="Stop after this long.")
@click.pass_context
def trace(ctx, iface, raw, duration):
    """Print one line per load-balancing decision until Ctrl-C.

    Tracing is on for the interface while this runs: a lease renewed every second,
    so it also ends within seconds when this is killed or its terminal closes.

    \b
    Example:
      xdplb trace eth0
      xdplb -n xdplb-lb trace eth0 --duration 5
    """
    _enter(ctx)
    session = report.TraceSession(iface)
    try:
        trace_mod.tracefs()
        # A closed terminal (SIGHUP) ends tracing at once like Ctrl-C; SIGKILL leaves it
        # to the lease.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        session.renew()
        click.echo(f"tracing {', '.join(session.names)} (Ctrl-C to stop)", err=True)
        try:
            for line in trace_mod.follow(session.ifindex, raw=raw, duration=duration, renew=session.renew):
                click.echo(line)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
    finally:
        session.close()


def _print_changes(lines: list[str], nothing: str = "no changes") -> None:
    for line in lines or [nothing]:
        click.echo(line)


SERVICE_ARG = click.argument("service", metavar="VIP:PORT[/PROTO]")


@main.group()
def service():
    """Add, remove and list services (VIP:PORT/PROTO) on an interface.

    \b
    Example:
      xdplb service add eth0 10.0.0.2:443/tcp
      xdplb service list eth0
    """


@service.command("add")
@click.argument("iface", shell_complete=complete_iface)
@SERVICE_ARG
@click.option("--clients", metavar="CIDR,...", help="Only these clients may use it [default: all].")
@click.option("--not-allowed", type=click.Choice(["drop", "pass"]), default="drop", show_default=True,
              help="What happens to clients outside --clients: dropped and counted, or passed to the kernel.")
@click.option("--ring-size", type=int, default=model.RING_SIZE_DEFAULT, show_default=True,
              help="Maglev table size (a prime).")
@click.option("--udp-timeout", type=int, default=0, metavar="SECONDS",
              help="A UDP service's own idle timeout [default: the interface's timeouts.udp].")
@click.option("--forward", type=click.Choice(model.FORWARD_MODES), default="nat", show_default=True,
              help="How packets reach the backends (see xdplb attach --help).")
@click.pass_context
def service_add(ctx, iface, service, clients, not_allowed, ring_size, udp_timeout, forward):
    """Add a service with no backends yet (add them with: xdplb backend add).

    \b
    Example:
      xdplb service add eth0 10.0.0.2:443/tcp
      xdplb service add eth0 10.0.0.2:53/udp --udp-timeout 30
    """
    _enter(ctx)
    _print_changes(control.service_add(iface, service, model.parse_networks(clients) if clients else [],
                                       ring_size, udp_timeout, not_allowed, forward))


@service.command("del")
@click.argument("iface", shell_complete=complete_iface)
@SERVICE_ARG
@click.pass_context
def service_del(ctx, iface, service):
    """Remove a service; its established flows keep going until they end.

    \b
    Example:
      xdplb service del eth0 10.0.0.2:443/tcp
    """
    _enter(ctx)
    _print_changes(control.service_del(iface, service))


@service.command("list")
@click.argument("iface", shell_complete=complete_iface)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def service_list(ctx, iface, as_json):
    """List the services of an interface.

    \b
    Example:
      xdplb service list eth0 --json
    """
    _enter(ctx)
    (entry,) = report.status(iface)
    if entry["program_id"] is None:
        report.attached(iface)  # says it is not attached, as every other command on one service does
    services = entry.get("services", [])
    if as_json:
        _echo_json([{k: s[k] for k in ("vip", "port", "proto", "forward", "clients", "not_allowed", "ring_size",
                                       "udp_timeout")} |
                    {"backends": len(s["backends"])} for s in services])
        return
    for s in services:
        timeout = f"  udp timeout {s['udp_timeout']} s" if s["udp_timeout"] else ""
        passing = "  others passed" if s["not_allowed"] == "pass" else ""
        click.echo(f"{s['name']}  {s['forward']}  backends {len(s['backends'])}  "
                   f"clients {', '.join(s['clients'])}{passing}  ring {s['ring_size']}{timeout}")
    if not services:
        click.echo(f"no services on {iface}")


@main.group()
def backend():
    """Add, remove, reweight, drain and list the backends of a service.

    \b
    Example:
      xdplb backend add eth0 10.0.0.2:443 10.0.0.11
      xdplb backend del eth0 10.0.0.2:443 10.0.0.11 --drain
    """


BACKEND_ARG = click.argument("backend_addr", metavar="ADDR[:PORT]")


@backend.command("add")
@click.argument("iface", shell_complete=complete_iface)
@SERVICE_ARG
@BACKEND_ARG
@click.option("--weight", type=click.IntRange(0, model.MAX_WEIGHT), default=1, show_default=True)
@click.pass_context
def backend_add(ctx, iface, service, backend_addr, weight):
    """Add a backend to a service, in place (no reload, no flow dropped).

    \b
    Example:
      xdplb backend add eth0 10.0.0.2:80 10.0.0.13 --weight 2
    """
    _enter(ctx)
    _print_changes(control.backend_add(iface, service, backend_addr, weight))


@backend.command("set")
@click.argument("iface", shell_complete=complete_iface)
@SERVICE_ARG
@BACKEND_ARG
@click.option("--weight", type=click.IntRange(0, model.MAX_WEIGHT), required=True,
              help="New weight; 0 drains: no new flows, existing flows go on.")
@click.pass_context
def backend_set(ctx, iface, service, backend_addr, weight):
    """Change a backend's weight (0: drain).

    \b
    Example:
      xdplb backend set eth0 10.0.0.2:80 10.0.0.11 --weight 0
    """
    _enter(ctx)
    _print_changes(control.backend_set(iface, service, backend_addr, weight))


@backend.command("del")
@click.argument("iface", shell_complete=complete_iface)
@SERVICE_ARG
@BACKEND_ARG
@click.option("--drain", is_flag=True, help="First stop new flows and wait for the backend's flows to end.")
@click.option("--timeout", type=float, default=300, show_default=True, metavar="SECONDS",
              help="With --drain: remove it anyway after this long.")
@click.pass_context
def backend_del(ctx, iface, service, backend_addr, drain, timeout):
    """Remove a backend; with --drain, only once its flows have ended.

    \b
    Example:
      xdplb backend del eth0 10.0.0.2:80 10.0.0.11 --drain --timeout 60
    """
    _enter(ctx)
    if not drain:
        _print_changes(control.backend_del(iface, service, backend_addr))
        return
    lines, left = control.drain(iface, service, backend_addr, timeout,
                                progress=lambda n: click.echo(f"draining: {n} flows left", err=True))
    _print_changes(lines)
    if left:
        click.echo(f"warning: removed after {timeout:g}s with {left} flows still active", err=True)


@backend.command("list")
@click.argument("iface", shell_complete=complete_iface)
@SERVICE_ARG
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def backend_list(ctx, iface, service, as_json):
    """List the backends of a service with their weights and active flows.

    \b
    Example:
      xdplb backend list eth0 10.0.0.2:80
    """
    _enter(ctx)
    rows = [{k: b[k] for k in ("address", "port", "weight", "active_flows", "new_flows")}
            for b in report.backend_list(iface, service)]
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(f"{model.host_text(ipaddress.ip_address(r['address']))}:{r['port']}  weight {r['weight']}  active flows {r['active_flows']}  "
                   f"flows so far {r['new_flows']}")
    if not rows:
        vip, port, proto = model.parse_service(service)
        click.echo(f"no backends in {model.host_text(vip)}:{port}/{proto}")


@main.command()
@click.argument("config_file", metavar="CONFIG.toml", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Only show what would change.")
@click.pass_context
def apply(ctx, config_file, dry_run):
    """Make the running state match a config file, changing only what differs.

    The whole file is checked first; if anything is wrong, nothing is applied. With
    --dry-run the exit status says whether anything would change: 0 no, 3 yes.

    \b
    Example:
      xdplb export > lb.toml; vi lb.toml; xdplb apply lb.toml --dry-run; xdplb apply lb.toml
    """
    _enter(ctx)
    lines = control.apply_config(config_file, dry_run)
    _print_changes([("would: " if dry_run else "") + l for l in lines], "no changes: the running state matches")
    if dry_run and lines:
        ctx.exit(EXIT_CHANGES_PENDING)


@main.command()
@click.argument("config_file", metavar="CONFIG.toml", type=click.Path(dir_okay=False))
def check(config_file):
    """Check a config file without applying it (no root needed): every problem with its
    location, exit 1 if there is any.

    \b
    Example:
      xdplb check /etc/xdplb/lb.toml && systemctl reload xdplb
    """
    interfaces, problems = config_mod.check(config_mod.read(config_file))
    problems += [f"interfaces.{i.name}: {p}" for i in interfaces for p in control.family_problems(i)]
    if problems:
        raise XdplbError(f"{config_file}: {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n  "
                         + "\n  ".join(problems))
    services = sum(len(i.services) for i in interfaces)
    click.echo(f"{config_file}: ok ({len(interfaces)} interface{'s' if len(interfaces) > 1 else ''}, "
               f"{services} service{'s' if services != 1 else ''})")


@main.command()
@click.argument("iface", required=False, shell_complete=complete_iface)
@click.pass_context
def export(ctx, iface):
    """Print the running state as a config file (for xdplb apply).

    \b
    Example:
      xdplb -n xdplb-lb export > lb.toml
    """
    _enter(ctx)
    click.echo(report.export(iface), nl=False)


def _rates(now: list[dict], before: list[dict] | None) -> None:
    """Adds packets/s and bytes/s to each service and backend from two samples (None
    without an earlier one)."""
    prev = {}
    if before:
        for e in before:
            for s in e["services"]:
                prev[(e["interface"], s["id"], None)] = (s, e["_monotonic"])
                for b in s["backends"]:
                    prev[(e["interface"], s["id"], b["id"])] = (b, e["_monotonic"])
    for e in now:
        for s in e["services"]:
            for item, key in [(s, (e["interface"], s["id"], None))] + \
                    [(b, (e["interface"], s["id"], b["id"])) for b in s["backends"]]:
                old = prev.get(key)
                dt = e["_monotonic"] - old[1] if old else 0
                item["packets_per_s"] = round((item["packets"] - old[0]["packets"]) / dt, 1) if old and dt > 0 else None
                item["bytes_per_s"] = round((item["bytes"] - old[0]["bytes"]) / dt, 1) if old and dt > 0 else None


def _public(entries: list[dict]) -> list[dict]:
    """Entries without the keys for this process's own use (a leading underscore)."""
    return [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]


def _rate(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _stats_table(entries: list[dict]) -> list[str]:
    lines = []
    for e in entries:
        lines.append(f"{e['interface']}: program {e['program_id']}, {e['mode']} mode")
        lines.append(f"  {'service / backend':32} {'weight':>6} {'active':>7} {'flows':>8} "
                     f"{'packets':>12} {'bytes':>14} {'pkt/s':>9} {'byte/s':>11}")
        for s in e["services"]:
            lines.append(f"  {s['name']:32} {'':>6} {s['active_flows']:>7} "
                         f"{s['new_flows']:>8} {s['packets']:>12} {s['bytes']:>14} "
                         f"{_rate(s['packets_per_s']):>9} {_rate(s['bytes_per_s']):>11}")
            for b in s["backends"]:
                lines.append(f"    {b['endpoint']:30} {b['weight']:>6} {b['active_flows']:>7} "
                             f"{b['new_flows']:>8} {b['packets']:>12} {b['bytes']:>14} "
                             f"{_rate(b['packets_per_s']):>9} {_rate(b['bytes_per_s']):>11}")
        for use in e.get("snat_sources", []):
            lines.append(f"  SNAT {use['snat']} -> {use['backend']}: {use['open']} open, "
                         f"{use['time_wait']} closed (reusable by newer SYNs) of {use['capacity']} ports")
        nonzero = ", ".join(f"{k} {v}" for k, v in e["counters"].items() if v) or "none yet"
        lines.append(f"  counters: {nonzero}")
        if e["counters"].get("snat_exhausted"):
            lines.append(f"  note: {report.SNAT_EXHAUSTED_REMEDY}")
    return lines


@main.command()
@click.argument("iface", required=False, shell_complete=complete_iface)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=False, flag_value=1.0, type=float, default=None, metavar="[SECONDS]",
              help="Refresh in place every SECONDS (default 1) until Ctrl-C.")
@click.option("--interval", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="Without --watch: sample twice this far apart to show rates (0: answer at once, no rates).")
@click.pass_context
def stats(ctx, iface, as_json, watch, interval):
    """Traffic per service and backend: packets, bytes, flows, active flows, rates.

    \b
    Example:
      xdplb stats eth0
      xdplb -n xdplb-lb stats --watch 2
    """
    _enter(ctx)
    if watch is None:
        before = None
        if interval > 0:
            before = report.stats(iface)
            time.sleep(interval)
        entries = report.stats(iface)
        _rates(entries, before)
        if as_json:
            _echo_json(_public(entries))
        else:
            click.echo("\n".join(_stats_table(entries)))
        return
    before = None
    try:
        while True:
            entries = report.stats(iface)
            _rates(entries, before)
            before = entries
            if as_json:
                click.echo(json.dumps(_public(entries), sort_keys=True))
            else:
                if sys.stdout.isatty():
                    click.echo("\x1b[H\x1b[2J", nl=False)  # redraw in place, like top
                click.echo("\n".join(_stats_table(entries)))
                click.echo(f"(every {watch:g}s; Ctrl-C to stop)")
            time.sleep(watch)
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("iface", required=False, shell_complete=complete_iface)
@click.option("--service", "-s", metavar="VIP:PORT[/PROTO]", help="Only this service's connections.")
@click.option("--backend", "-b", metavar="ADDR[:PORT]", help="Only this backend's (of --service).")
@click.option("--limit", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Show at most this many per interface, most recently seen first (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def flows(ctx, iface, service, backend, limit, as_json):
    """The open connections: client, VIP, backend, SNAT source (or dsr/ipip), state, idle.

    \b
    Example:
      xdplb flows eth0 --service 10.0.0.2:80 --backend 10.0.0.11 --limit 20
    """
    _enter(ctx)
    entries = report.flows(iface, service, backend, limit)
    if as_json:
        _echo_json(entries)
        return
    for e in entries:
        click.echo(f"{e['interface']}: {e['total']} connections" +
                   (f", the {e['shown']} seen last:" if e["shown"] < e["total"] else ""))
        if e["connections"]:
            click.echo(f"  {'proto':5} {'client':21} {'vip':21} {'backend':21} {'via':21} {'state':11} idle s")
        for c in e["connections"]:
            click.echo(f"  {c['proto']:5} {c['client']:21} {c['vip']:21} {c['backend']:21} {c['via']:21} "
                       f"{c['state']:11} {c['idle_s']:.1f}")


@main.command()
@click.argument("config_file", metavar="CONFIG.toml", type=click.Path(dir_okay=False))
@click.option("--metrics", default="127.0.0.1:9433", show_default=True, metavar="HOST:PORT",
              help="Where to serve Prometheus metrics.")
@click.option("--detach-on-exit", is_flag=True, help="Detach on SIGTERM instead of leaving the data plane forwarding.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Log events of this level and above.")
@click.option("--log-format", type=click.Choice(["logfmt", "json"]), default="logfmt", show_default=True,
              help="One logfmt line per event, or one JSON object.")
@click.pass_context
def serve(ctx, config_file, metrics, detach_on_exit, log_level, log_format):
    """Run in the foreground: apply the config, health-check backends, serve metrics.

    SIGHUP reloads the file (a bad one is refused and the running state kept); SIGTERM
    exits and leaves the data plane forwarding. Logs go to stderr, one line per event.

    \b
    Example:
      xdplb -n xdplb-lb serve lb.toml --metrics 127.0.0.1:9433
    """
    from . import logs
    from .serve import Server, parse_metrics_address
    parse_metrics_address(metrics)  # a usage error before anything else
    logs.configure(log_level, log_format)
    _enter(ctx)
    Server(config_file, metrics, detach_on_exit).run()


@main.command()
@click.argument("iface", shell_complete=complete_iface)
@click.pass_context
def upgrade(ctx, iface):
    """Replace the running program with the one built last, keeping every flow.

    The new program takes over the running maps (flow table, services, counters) and is
    swapped in atomically; if its maps do not fit, nothing changes.

    \b
    Example:
      xdplb build && xdplb upgrade eth0
    """
    _enter(ctx)
    click.echo(control.upgrade(iface))


@main.group()
def decap():
    """On a backend of ipip services: decapsulate IPIP in XDP, and hold the VIPs.

    This kernel has no ipip module; the balancer's IPIP packets to this host lose their
    outer header in xdplb's decapsulator and go to the stack as plain packets for a VIP.

    \b
    Example:
      xdplb decap attach eth0 --vip 10.0.0.2
      xdplb decap status
      xdplb decap detach eth0
    """


@decap.command("attach")
@click.argument("iface", shell_complete=complete_iface)
@click.option("--vip", metavar="VIP[,VIP...]",
              help="Also put these on lo (as /32) and set the ARP sysctls arp_ignore=1, arp_announce=2 "
                   "(conf.all), so that this host takes their packets but never answers ARP for them "
                   "[default: none; again on an attached interface: the VIPs it has].")
@click.option("--mode", default="auto", show_default=True, type=click.Choice(["auto", "native", "generic"]),
              help="XDP mode; auto prefers native and falls back to generic.")
@click.option("--force", is_flag=True, help="Replace an XDP program that is not xdplb's decapsulator.")
@click.pass_context
def decap_attach(ctx, iface, vip, mode, force):
    """Decapsulate IPIP addressed to this host arriving on IFACE.

    Running it again updates the addresses it decapsulates for (this host's) and the VIPs.

    \b
    Example:
      xdplb decap attach eth0 --vip 10.0.0.2
      xdplb -n backend1 decap attach eth0 --vip 10.0.0.2,10.0.0.3 --mode generic
    """
    vips = backendhost.parse_vips(vip) if vip is not None else None
    _enter(ctx)
    _print_changes(decap_mod.attach(iface, vips, mode, force))


@decap.command("detach")
@click.argument("iface", shell_complete=complete_iface)
@click.option("--force", is_flag=True, help="Also remove an XDP program that is not xdplb's decapsulator.")
@click.pass_context
def decap_detach(ctx, iface, force):
    """Remove the decapsulator from IFACE and undo what attaching it changed.

    VIPs it added leave lo unless another interface's decapsulator still wants them, and
    the ARP sysctls get their earlier values back once no interface has VIPs.

    \b
    Example:
      xdplb decap detach eth0
    """
    _enter(ctx)
    _print_changes(decap_mod.detach(iface, force))


@decap.command("status")
@click.argument("iface", required=False, shell_complete=complete_iface)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def decap_status(ctx, iface, as_json):
    """Show the decapsulator's program, mode, VIPs and counters.

    \b
    Example:
      xdplb decap status
      xdplb -n backend1 decap status eth0 --json
    """
    _enter(ctx)
    data = decap_mod.status(iface)
    if as_json:
        _echo_json(data)
        return
    for e in data["interfaces"]:
        vips = f"VIPs on lo: {', '.join(e['vips'])}" if e["vips"] else "no VIPs"
        if e["program_id"] is None:
            held = f"; {vips} still held: xdplb decap detach {e['interface']} releases them" if e["vips"] else ""
            click.echo(f"{e['interface']}: no decapsulator{held}")
            continue
        click.echo(f"{e['interface']}: decap program {e['program_id']}, {e['mode']} mode, {vips}")
        click.echo(f"  decapsulates IPIP and ip6ip6 to: {', '.join(e['local_addresses']) or 'nothing'}")
        if e.get("outdated"):
            click.echo(f"  built by an older xdplb (IPv4 addresses only): run xdplb decap attach {e['interface']} "
                       "again to replace it")
        elif e["addresses_changed"]:
            click.echo(f"  this host's addresses changed since: run xdplb decap attach {e['interface']} again")
        nonzero = {k: v for k, v in e["counters"].items() if v}
        click.echo("  counters: " + (", ".join(f"{k} {v}" for k, v in nonzero.items()) or "none yet"))
    if not data["interfaces"]:
        click.echo("the decapsulator is not attached here")
    changed = data["host"]["sysctls_changed"]
    if changed:
        click.echo("sysctls: " + ", ".join(f"{name} {value} (was {changed[name]['before']})"
                                           for name, value in data["host"]["sysctls"].items() if name in changed))


@main.command()
@click.option("--backends", type=click.IntRange(1, lab_mod.MAX_BACKENDS), default=lab_mod.DEFAULT_BACKENDS, show_default=True)
@click.option("--forward", type=click.Choice(model.FORWARD_MODES), default="nat", show_default=True,
              help="Forwarding mode to show (with dsr and ipip backends see the real client address).")
def demo(backends, forward):
    """Run the whole demo on the built-in lab, then clean up.

    \b
    Example:
      xdplb demo
    """
    from .demo import run_demo
    run_demo(backends, forward)


@main.group()
def lab():
    """The built-in lab: client, load balancer and backends in network namespaces.

    \b
    Example:
      xdplb lab up --backends 3 && xdplb -n xdplb-lb attach eth0 --backends 10.42.0.101,10.42.0.102
    """


@lab.command("up")
@click.option("--backends", type=int, default=lab_mod.DEFAULT_BACKENDS, show_default=True, help="How many backends.")
@click.option("--clients", type=int, default=lab_mod.DEFAULT_CLIENTS, show_default=True, help="How many client namespaces.")
@click.option("--forward", type=click.Choice(model.FORWARD_MODES), default="nat", show_default=True,
              help="Prepare the backends for this forwarding mode (dsr: the VIP on their lo; ipip: also "
                   "xdplb decap on their eth0).")
@click.option("--prefix", default=lab_mod.DEFAULT_PREFIX, show_default=True, hidden=True)
def lab_up(backends, clients, forward, prefix):
    """Create the lab (idempotent).

    \b
    Example:
      xdplb lab up --backends 3
    """
    hosts = lab_mod.up(backends, clients, prefix, forward)
    for h in hosts:
        click.echo(f"{h.namespace:22} {h.address:12} {h.role}")
    # The lab gives the peer veth an XDP program and turns checksum offload off: native works.
    click.echo(f"next: xdplb -n {prefix}-lb attach eth0 --mode native --backends "
               + ",".join(h.address for h in hosts if h.role == "backend")
               + (f" --forward {forward}" if forward != "nat" else ""))


@lab.command("down")
@click.option("--prefix", default=lab_mod.DEFAULT_PREFIX, show_default=True, hidden=True)
def lab_down(prefix):
    """Remove the lab: servers, namespaces, everything.

    \b
    Example:
      xdplb lab down
    """
    removed = lab_mod.down(prefix)
    click.echo(f"removed {len(removed)} namespaces" if removed else "no lab to remove")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--prefix", default=lab_mod.DEFAULT_PREFIX, show_default=True, hidden=True)
def lab_status(as_json, prefix):
    """Show the lab's namespaces, addresses and servers.

    \b
    Example:
      xdplb lab status --json
    """
    data = lab_mod.status(prefix)
    if as_json:
        _echo_json(data)
        return
    if not data["up"]:
        click.echo("the lab is down (start it with: xdplb lab up)")
        return
    for h in data["hosts"]:
        server = f"server pid {h['pid']}" if h["pid"] else ("server not running" if h["role"] == "backend" else "")
        click.echo(f"{h['namespace']:22} {h['address']:12} {h['address6']:16} {h['role']:8} {server}")


