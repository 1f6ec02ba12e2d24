# SPDX-License-Identifier: Apache-2.0
"""The lab's backend server: HTTP/1.1 (keep-alive) and UDP echo, each answer naming
the backend, like the demo's nginx hello page. Run as: python -m xdplb.labserver."""
from __future__ import annotations

import argparse
import socket
import struct
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
            # A body (an upload test) is read in full and its size sent back.
            received = len(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Backend", name)
            self.send_header("X-Client", self.client_address[0])  # who the backend saw: SNAT or real client
            self.send_header("X-Received", str(received))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr


def udp_echo(port: int, prefix: bytes) -> None:
    """Echoes datagrams, answering from the address each was sent to (IP_PKTINFO): with
    dsr and ipip the VIP sits on lo, and a plain sendto would answer from eth0's address,
    which a client talking to the VIP ignores."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
    sock.bind(("0.0.0.0", port))
    while True:
        data, ancillary, _, client = sock.recvmsg(65535, socket.CMSG_SPACE(_PKTINFO.size))
        local = next((_PKTINFO.unpack(c[:_PKTINFO.size])[2] for level, kind, c in ancillary
                      if level == socket.SOL_IP and kind == IP_PKTINFO), None)
        cmsg = [(socket.SOL_IP, IP_PKTINFO, _PKTINFO.pack(0, local, bytes(4)))] if local else []
        sock.sendmsg([prefix + data], cmsg, 0, client)


_PKTINFO6 = struct.Struct("=16sI")  # struct in6_pktinfo: address, ifindex


def udp_echo6(port: int, prefix: bytes) -> None:
    """udp_echo for IPv6 clients (IPV6_PKTINFO names the address each was sent to)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    sock.bind(("::", port))
    while True:
        data, ancillary, _, client = sock.recvmsg(65535, socket.CMSG_SPACE(_PKTINFO6.size))
        local = next((c[:_PKTINFO6.size] for level, kind, c in ancillary
                      if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO), None)
        cmsg = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, local)] if local else []
        sock.sendmsg([prefix + data], cmsg, 0, client)


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
    http6 = HTTP6Server(("::", args.http_port), make_handler(args.name, args.address))
    threading.Thread(target=udp_echo, args=(args.udp_port, f"{args.name} ({args.address}): ".encode()),
                     daemon=True).start()
    threading.Thread(target=udp_echo6, args=(args.udp_port, f"{args.name} ({args.address}): ".encode()),
                     daemon=True).start()
    threading.Thread(target=http6.serve_forever, daemon=True).start()
    http.serve_forever()


class HTTP6Server(ThreadingHTTPServer):
    """The same server on IPv6, beside the IPv4 one rather than dual-stack: an IPv4
    client then keeps its own address in X-Client, not an IPv4-mapped IPv6 one."""
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


if __name__ == "__main__":
    main()
