# SPDX-License-Identifier: Apache-2.0
"""Nothing a check or a reload raises stops serve or a checker thread: a check that
raises is logged, counted and tried again; a file with wrong-typed values is refused
with every problem and the running state kept."""
from __future__ import annotations

import threading
import time

from xdplb import config, control, health, serve

KEY = ("eth0", "10.0.0.2:80/tcp", "10.0.0.11:80")


def test_a_checker_survives_a_check_that_raises_and_keeps_checking(monkeypatch):
    results = iter([TypeError("an integer is required (got type float)"), TypeError("again"),
                    (False, "refused")])

    def probe(spec, address, port):
        result = next(results, (False, "refused"))
        if isinstance(result, Exception):
            raise result
        return result
    monkeypatch.setattr(health, "probe", probe)
    errors, changes, down = [], [], threading.Event()

    def on_change(key, up, reason):
        changes.append((key, up, reason))
        down.set()
    checker = health.Checker(on_change, on_error=lambda key, exc: errors.append((key, type(exc).__name__)))
    checker.set_targets({KEY: (health.CheckSpec(interval=0.05, timeout=0.01, fall=1), "10.0.0.11", 80)})
    try:
        assert down.wait(5), "the checker thread stopped checking after the errors"
    finally:
        checker.stop()
    assert errors == [(KEY, "TypeError"), (KEY, "TypeError")]
    # The errors said nothing about the backend: only the real failure took it down.
    assert changes == [(KEY, False, "refused")]


def test_a_failing_on_error_hook_does_not_end_the_thread_either(monkeypatch):
    calls = []

    def probe(spec, address, port):
        calls.append(1)
        raise ValueError("bug")

    def on_error(key, exc):
        raise RuntimeError("the hook is broken too")
    monkeypatch.setattr(health, "probe", probe)
    checker = health.Checker(lambda *a: None, on_error=on_error)
    checker.set_targets({KEY: (health.CheckSpec(interval=0.05, timeout=0.01), "10.0.0.11", 80)})
    try:
        time.sleep(0.5)
    finally:
        checker.stop()
    assert len(calls) >= 3


def test_serve_logs_and_counts_a_check_that_raises(capsys, tmp_path):
    server = serve.Server(str(tmp_path / "lb.toml"))
    try:
        raise TypeError("an integer is required (got type float)")
    except TypeError as exc:
        error = exc
    for _ in range(3):
        server._check_failed(KEY, error)
    lines = [line for line in capsys.readouterr().err.splitlines() if "event=health_check_error" in line]
    assert len(lines) == 1  # the same reason again within a minute is only counted
    assert ("level=error event=health_check_error interface=eth0 service=10.0.0.2:80/tcp "
            "backend=10.0.0.11:80") in lines[0]
    assert 'reason="unexpected TypeError: an integer is required (got type float)"' in lines[0]
    assert "at=test_health_checks.py:" in lines[0]
    labels = {"interface": "eth0", "service": "10.0.0.2:80/tcp", "backend": "10.0.0.11:80"}
    assert server.metrics.registry.get_sample_value("xdplb_health_check_errors_total", labels) == 3


GOOD = """
[interfaces.eth0]
[[interfaces.eth0.services]]
vip = "10.0.0.2"
port = 80
backends = [ { address = "10.0.0.11" } ]
health = { type = "udp", interval = 2.0 }
"""


def test_a_reload_with_wrong_typed_values_is_refused_with_every_location(monkeypatch, capsys, tmp_path):
    path = tmp_path / "lb.toml"
    server = serve.Server(str(path))
    server.desired = running = config.parse(GOOD)
    monkeypatch.setattr(control, "reconcile", lambda *a: (_ for _ in ()).throw(AssertionError("applied")))
    path.write_text(GOOD.replace("port = 80\n", "port = 80\nclients = 10\n")
                    .replace('type = "udp"', 'type = "udp", port = 80.5'))
    server._reload()
    (line,) = capsys.readouterr().err.splitlines()
    assert "level=error event=reload_failed" in line
    assert "interfaces.eth0.services[0].clients: must be an array of CIDR strings" in line
    assert "interfaces.eth0.services[0].health.port: must be a whole number from 1 to 65535, not 80.5" in line
    assert server.desired is running


def test_a_reload_that_fails_unexpectedly_keeps_and_restores_the_running_state(monkeypatch, capsys, tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(GOOD.replace("10.0.0.11", "10.0.0.12"))
    server = serve.Server(str(path))
    server.desired = running = config.parse(GOOD)
    applied = []

    def reconcile(desired, dry_run, where):
        applied.append([str(b.addr) for b in desired[0].services[0].backends])
        if len(applied) == 1:
            raise TypeError("a bug half way")
        return []
    monkeypatch.setattr(control, "reconcile", reconcile)
    server._reload()
    err = capsys.readouterr().err
    assert "event=reload_failed" in err and 'reason="unexpected TypeError: a bug half way"' in err
    assert applied == [["10.0.0.12"], ["10.0.0.11"]]  # the new file, then the running state again
    assert server.desired is running
    assert server.metrics.registry.get_sample_value("xdplb_serve_errors_total", {"during": "reload"}) == 1


# ---- HTTPS ---------------------------------------------------------------------------

def _https_server(tmp_path):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for backend.test; it
    records the SNI name and the Host header it was given."""
    import http.server
    import shutil
    import ssl
    import subprocess

    from tests.conftest import require
    require(shutil.which("openssl") is not None, "needs openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=backend.test", "-addext", "subjectAltName=DNS:backend.test", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen["host"] = self.headers["Host"]
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: seen.__setitem__("sni", name)
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_https_checks_send_the_name_and_verify_unless_told_not_to(tmp_path):
    server, seen = _https_server(tmp_path)
    port = server.server_address[1]
    try:
        def spec(**table):
            problems = []
            got = health.parse_check("health", {"type": "http", "tls": True, **table},
                                     lambda where, what: problems.append(f"{where}: {what}"))
            assert not problems
            return got
        assert health.probe(spec(verify=False, server_name="backend.test"), "127.0.0.1", port) == (True, "HTTP 200")
        assert seen == {"sni": "backend.test", "host": f"backend.test:{port}"}
        ok, reason = health.probe(spec(server_name="backend.test"), "127.0.0.1", port)
        assert not ok and reason.startswith("SSLCertVerificationError")  # self-signed: not trusted
        assert not health.probe(spec(port=1, verify=False), "127.0.0.1", port)[0]
    finally:
        server.shutdown()


def test_tls_options_are_checked():
    problems = []
    health.parse_check("h", {"type": "tcp", "tls": True}, lambda where, what: problems.append(f"{where}: {what}"))
    health.parse_check("h", {"type": "http", "tls": "yes"}, lambda where, what: problems.append(f"{where}: {what}"))
    assert problems == ['h: tls, server_name and verify apply to type = "http" only',
                        "h.tls: must be true or false, not 'yes'"]
