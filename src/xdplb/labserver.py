# SPDX-License-Identifier: Apache-2.0
"""The lab's backend server: HTTP/1.1 (keep-alive) and UDP echo, each answer naming
the backend, like the demo's nginx hello page. Run as: python -m xdplb.labserver."""
from __future__ import annotations

import argparse
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HTTP_PORT = 80
UDP_PORT = 5353


def make_handler(name: str, address: str):
    body = f"hello from {name} ({address})\n".encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in separate writes; with Nagle on, each keep-alive
        # response would wait for the client's delayed ACK.
        disable_nagle_algorithm = True

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Backend", name)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


class UdpEcho(socketserver.BaseRequestHandler):
    reply_prefix = b""

    def handle(self):
        data, sock = self.request
        sock.sendto(self.reply_prefix + data, self.client_address)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--address", default="0.0.0.0")
    parser.add_argument("--http-port", type=int, default=HTTP_PORT)
    parser.add_argument("--udp-port", type=int, default=UDP_PORT)
    args = parser.parse_args()
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 1024
    http = ThreadingHTTPServer(("0.0.0.0", args.http_port), make_handler(args.name, args.address))
    UdpEcho.reply_prefix = f"{args.name} ({args.address}): ".encode()
    udp = socketserver.ThreadingUDPServer(("0.0.0.0", args.udp_port), UdpEcho)
    threading.Thread(target=udp.serve_forever, daemon=True).start()
    http.serve_forever()


if __name__ == "__main__":
    main()
