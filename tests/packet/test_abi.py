# SPDX-License-Identifier: Apache-2.0
"""src/xdplb/abi.py against bpf/xdplb_abi.h: struct layouts from the compiled object's
DWARF (pyelftools), constants from the header text."""
from __future__ import annotations

import ctypes
import re

import pytest
from elftools.elf.elffile import ELFFile

from xdplb import abi, build
from xdplb.libbpf import libbpf


def dwarf_structs(path) -> dict[str, dict]:
    out = {}
    with open(path, "rb") as f:
        dwarf = ELFFile(f).get_dwarf_info()
        for cu in dwarf.iter_CUs():
            for die in cu.iter_DIEs():
                if die.tag != "DW_TAG_structure_type" or "DW_AT_name" not in die.attributes:
                    continue
                name = die.attributes["DW_AT_name"].value.decode()
                if name not in abi.STRUCTS or name in out:
                    continue
                members = {}
                for m in die.iter_children():
                    if m.tag == "DW_TAG_member":
                        members[m.attributes["DW_AT_name"].value.decode()] = \
                            m.attributes["DW_AT_data_member_location"].value
                out[name] = {"size": die.attributes["DW_AT_byte_size"].value, "members": members}
    return out


@pytest.fixture(scope="module")
def structs(bpf_object):
    return dwarf_structs(bpf_object)


@pytest.mark.parametrize("name", sorted(abi.STRUCTS))
def test_struct_layout_matches_dwarf(structs, name):
    cls = abi.STRUCTS[name]
    assert name in structs, f"struct {name} is not in the object's DWARF"
    c = structs[name]
    assert ctypes.sizeof(cls) == c["size"]
    py = {f[0]: getattr(cls, f[0]).offset for f in cls._fields_}
    assert py == c["members"]


def header_constants() -> dict[str, int]:
    text = (build.BPF_DIR / "xdplb_abi.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    values = {}

    def evaluate(expr: str) -> int:
        expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)u(ll)?\b", r"\1", expr.strip())
        for name, value in values.items():
            expr = re.sub(rf"\b{name}\b", str(value), expr)
        assert re.fullmatch(r"[0-9a-fxA-FX()<>*+/ -]+", expr), expr
        return eval(expr.replace("/", "//"))  # digits and operators only, checked above

    for m in re.finditer(r"#define (XDPLB_\w+) ([^\n\"]+)\n", text):
        values[m.group(1)] = evaluate(m.group(2))
    for body in re.findall(r"enum \w+ \{(.*?)\};", text, flags=re.S):
        nxt = 0
        for item in [i.strip() for i in body.split(",") if i.strip()]:
            name, _, expr = item.partition("=")
            nxt = evaluate(expr) if expr else nxt
            values[name.strip()] = nxt
            nxt += 1
    return values


def test_constants_match_header():
    h = header_constants()
    for name in ("ABI_VERSION", "MAX_SERVICES", "SERVICE_SLOTS", "SERVICE_PROBES", "MAX_BACKENDS", "MAX_CLIENT_RULES", "MAX_SNAT_ADDRS", "FLOW_SLOTS_DEFAULT",
                 "FLOW_PROBES", "TICK_MIN_NS", "PORTS", "NO_BACKEND", "SNAT_PORT_TRIES", "TRACE_LEASE_MAX_TICKS",
                 "RING_SLOTS", "RING_SLOTS_PER_ENTRY", "RING_ENTRIES"):
        assert getattr(abi, name) == h[f"XDPLB_{name}"], name
    enums = {"XDPLB_PORT_": abi.PortFlags, "XDPLB_CFG_": abi.ConfigFlags, "XDPLB_SVC_": abi.ServiceFlags,
             "XDPLB_BACKEND_": abi.BackendFlags, "XDPLB_FLOW_": abi.FlowFlags, "XDPLB_CNT_": abi.Counter,
             "XDPLB_EV_": abi.TraceEvent}
    for prefix, enum in enums.items():
        from_header = {k[len(prefix):]: v for k, v in h.items() if k.startswith(prefix)
                       and not k.startswith(("XDPLB_FLOW_SLOTS", "XDPLB_FLOW_PROBES"))}
        assert from_header == {m.name: m.value for m in enum}, prefix


def test_trace_tag_matches_header():
    text = (build.BPF_DIR / "xdplb_abi.h").read_text()
    assert f'#define XDPLB_TRACE_TAG "{abi.TRACE_TAG}"' in text
    assert f'#define XDPLB_TRACE_TAG6 "{abi.TRACE_TAG6}"' in text


def test_the_verifier_has_room_to_spare(bpf_object):
    """The verifier walks every path of xdplb_main within a budget of 1M instructions;
    other kernels walk differently, so the count here must stay far below it (a change
    that multiplies paths shows up here first, not as a load failure elsewhere)."""
    lib = libbpf()
    obj = lib.open_object(str(bpf_object))
    prog = lib.lib.bpf_object__find_program_by_name(ctypes.c_void_p(obj), abi.PROGRAM_NAME.encode())
    log = ctypes.create_string_buffer(1 << 20)
    lib.lib.bpf_program__set_log_level.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.lib.bpf_program__set_log_buf.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.lib.bpf_program__set_log_level(prog, 4)  # statistics only
    lib.lib.bpf_program__set_log_buf(prog, log, len(log))
    lib.load_opened(obj)  # a rejection raises with the log (and closes the object itself)
    lib.bpf_object__close(obj)
    processed = int(re.search(r"processed (\d+) insns", log.value.decode()).group(1))
    assert 0 < processed < 600_000, processed
