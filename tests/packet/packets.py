# SPDX-License-Identifier: Apache-2.0
"""Building packets with scapy; scapy computes every checksum independently of the
data plane's incremental updates, so comparing bytes checks them too."""
from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.l2 import ARP, Ether
from scapy.layers.inet6 import IPv6

CLIENT_MAC = "02:00:00:00:00:0c"
CLIENT2_MAC = "02:00:00:00:00:0d"
LB_MAC = "02:00:00:00:00:01"
BACKEND_MAC = "02:00:00:00:00:b1"
BACKEND2_MAC = "02:00:00:00:00:b2"
ROUTER_MAC = "02:00:00:00:00:99"

VIP = "10.0.0.2"
SNAT = "10.0.0.2"
SNAT2 = "10.0.0.3"  # a second SNAT address, for pool tests
CLIENT = "10.0.1.10"
CLIENT2 = "10.0.1.11"
BACKEND = "10.0.0.101"
BACKEND2 = "10.0.0.102"

__all__ = ["ARP", "Ether", "ICMP", "IP", "IPOption_RR", "IPv6", "TCP", "UDP", "build", "tcp", "udp"]


def build(pkt) -> bytes:
    """Serialises with every length and checksum computed by scapy."""
    return bytes(pkt.__class__(bytes(pkt)))


def tcp(src, sport, dst, dport, flags="S", smac=CLIENT_MAC, dmac=LB_MAC, ttl=64, seq=1000,
        payload=b"", ip_id=1, options=None, ack=0, tcp_options=()) -> bytes:
    """options: IPv4 options; tcp_options: scapy's TCP options, e.g. [("Timestamp", (tsval, tsecr))]."""
    ip = IP(src=src, dst=dst, ttl=ttl, id=ip_id, flags="DF")
    if options:
        ip.options = options
    return build(Ether(src=smac, dst=dmac) / ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                                                       window=64240, options=list(tcp_options)) / payload)


def udp(src, sport, dst, dport, smac=CLIENT_MAC, dmac=LB_MAC, ttl=64, payload=b"ping", ip_id=1,
        zero_checksum=False) -> bytes:
    pkt = Ether(src=smac, dst=dmac) / IP(src=src, dst=dst, ttl=ttl, id=ip_id) / UDP(sport=sport, dport=dport) / payload
    if zero_checksum:
        raw = Ether(bytes(pkt))
        raw[UDP].chksum = 0
        return bytes(raw)
    return build(pkt)
