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


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum_errors(frame: bytes) -> list[str]:
    """Checks an Ethernet/IPv4 frame's IPv4 header checksum and its TCP or UDP checksum
    from scratch (RFC 1071 over the bytes as they are, pseudo-header included), without
    scapy: what is wrong, or [] if both are right. A UDP checksum of 0 means none."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return ["not an IPv4 frame"]
    ihl = (frame[14] & 0x0F) * 4
    total = int.from_bytes(frame[16:18], "big")
    header = frame[14:14 + ihl]
    errors = []
    if ihl < 20 or len(frame) < 14 + total or total < ihl:
        return [f"bad lengths: ihl {ihl}, total {total}, frame {len(frame)}"]
    if _ones_sum(header) != 0xFFFF:
        errors.append(f"IPv4 header checksum {header[10:12].hex()} is wrong")
    proto, l4 = header[9], frame[14 + ihl:14 + total]
    if proto in (6, 17):
        if proto == 17 and l4[6:8] == b"\0\0":
            return errors
        pseudo = header[12:20] + bytes([0, proto]) + len(l4).to_bytes(2, "big")
        if _ones_sum(pseudo + l4) != 0xFFFF:
            name = "TCP" if proto == 6 else "UDP"
            at = 16 if proto == 6 else 6
            errors.append(f"{name} checksum {l4[at:at + 2].hex()} is wrong")
    return errors
