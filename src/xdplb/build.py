# SPDX-License-Identifier: Apache-2.0
"""Compiling bpf/ with clang and checking the object with pyelftools."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import abi, decap_abi
from .errors import PrerequisiteError, XdplbError

ROOT = Path(os.environ.get("XDPLB_ROOT", Path(__file__).resolve().parents[2]))
BPF_DIR = ROOT / "bpf"
BUILD_DIR = ROOT / "build"
OBJECT = BUILD_DIR / "xdplb.bpf.o"
SOURCE = BPF_DIR / "xdplb.bpf.c"
# The backends' decapsulator (ipip mode), loaded by decap.py.
DECAP_OBJECT = BUILD_DIR / "decap.bpf.o"
DECAP_SOURCE = BPF_DIR / "decap.bpf.c"
# The control plane's native Maglev fill (maglev.py loads it; without it the Python
# reference does the same work, a hundred times slower).
NATIVE_MAGLEV = BUILD_DIR / "libxdplb_maglev.so"
NATIVE_MAGLEV_SOURCE = Path(__file__).resolve().parent / "native" / "maglev.c"
# libbpf built from the libbpf/ submodule by `make build` installs its headers here.
BUNDLED_HEADERS = BUILD_DIR / "libbpf" / "include"
SYSTEM_HEADERS = Path("/usr/include")
GPL_COMPATIBLE = {"GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL",
                  "Dual MPL/GPL"}
PROGRAM_SECTION = "xdp"


@dataclass
class ObjectReport:
    path: Path
    size: int
    instructions: int
    license: str
    maps: list[str]
    btf: bool
    libbpf_headers: str = ""
    problems: list[str] = field(default_factory=list)


def libbpf_headers() -> tuple[Path, str]:
    """Include directory holding bpf/bpf_helpers.h, and where it came from."""
    if (BUNDLED_HEADERS / "bpf" / "bpf_helpers.h").exists():
        return BUNDLED_HEADERS, "libbpf submodule (build/libbpf)"
    if (SYSTEM_HEADERS / "bpf" / "bpf_helpers.h").exists():
        return SYSTEM_HEADERS, "system libbpf-dev"
    raise PrerequisiteError("libbpf headers not found (bpf/bpf_helpers.h); install them with: "
                            "apt-get install libbpf-dev")


def _arch_include() -> str:
    """Where asm/types.h lives: linux/types.h needs it even for the bpf target."""
    found = sorted(glob.glob("/usr/include/*-linux-gnu*/asm/types.h"))
    if not found:
        raise PrerequisiteError("kernel headers not found (asm/types.h); install them with: "
                                "apt-get install linux-libc-dev libc6-dev")
    return str(Path(found[0]).parent.parent)


def compile_command(clang: str, headers: Path, source: Path, output: Path) -> list[str]:
    # -mcpu=v3: compare-and-swap, with which the flow table claims slots.
    return [clang, "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
            "-I", str(headers), "-I", _arch_include(), "-I", str(BPF_DIR),
            "-c", str(source), "-o", str(output)]


def compile_object(output: Path = OBJECT, clang: str | None = None, source: Path = SOURCE,
                   check: bool = True, required_maps=abi.MAPS) -> ObjectReport:
    """Compiles one BPF source; `check` applies the object checks, required_maps being
    the maps its loader needs (the data plane's by default)."""
    clang = clang or os.environ.get("CLANG", "clang")
    if shutil.which(clang) is None:
        raise PrerequisiteError(f"{clang} not found; install it with: apt-get install clang llvm")
    headers, origin = libbpf_headers()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    proc = subprocess.run(compile_command(clang, headers, source, tmp), capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = [l for l in proc.stderr.splitlines() if "error" in l] or proc.stderr.splitlines()
        raise XdplbError(f"clang failed to compile {source.name}: " + (lines[0] if lines else "no output")
                         + "\n  " + "\n  ".join(proc.stderr.splitlines()[:20]))
    report = inspect_object(tmp, required_maps) if check else ObjectReport(tmp, tmp.stat().st_size, 0, "", [], True)
    if report.problems:
        tmp.unlink(missing_ok=True)
        raise XdplbError(f"the compiled object is unusable: {'; '.join(report.problems)}")
    tmp.replace(output)
    report.path = output
    report.libbpf_headers = f"{origin}: {headers}"
    return report


def compile_all(clang: str | None = None) -> tuple[list[ObjectReport], Path]:
    """What `xdplb build` makes: the data plane and the backends' decapsulator, and the
    native Maglev fill."""
    objects = [compile_object(OBJECT, clang, SOURCE),
               compile_object(DECAP_OBJECT, clang, DECAP_SOURCE, required_maps=decap_abi.MAPS)]
    return objects, compile_native(clang)


def compile_native(clang: str | None = None, output: Path = NATIVE_MAGLEV) -> Path:
    """The Maglev fill as a shared object for this machine. It uses no libc (no headers
    to install, nothing to link), only the compiler the BPF objects need."""
    clang = clang or os.environ.get("CLANG", "clang")
    if shutil.which(clang) is None:
        raise PrerequisiteError(f"{clang} not found; install it with: apt-get install clang llvm")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    proc = subprocess.run([clang, "-O2", "-shared", "-fPIC", "-nostdlib", "-Wall", "-Werror",
                           str(NATIVE_MAGLEV_SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise XdplbError(f"clang failed to build {NATIVE_MAGLEV_SOURCE.name}:\n  "
                         + "\n  ".join(proc.stderr.splitlines()[:20]))
    tmp.replace(output)  # a new inode: a process that loaded the old one keeps it intact
    return output


def inspect_object(path: Path, required=abi.MAPS) -> ObjectReport:
    """Checks what the loader relies on: the program section, every map it needs,
    a GPL-compatible licence (for GPL-only helpers) and BTF (for the map definitions)."""
    from elftools.elf.elffile import ELFFile  # here: most commands never build, and it costs 30 ms to import
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if elf["e_machine"] != "EM_BPF":
            return ObjectReport(path, path.stat().st_size, 0, "", [], False,
                                problems=[f"{path} is not a BPF object"])
        problems = []
        prog = elf.get_section_by_name(PROGRAM_SECTION)
        if prog is None:
            problems.append(f"no '{PROGRAM_SECTION}' program section")
        lic_sec = elf.get_section_by_name("license")
        lic = lic_sec.data().rstrip(b"\0").decode() if lic_sec else ""
        if lic not in GPL_COMPATIBLE:
            problems.append(f"licence {lic!r} is not GPL-compatible")
        maps_sec_index = next((i for i, s in enumerate(elf.iter_sections()) if s.name == ".maps"), None)
        symtab = elf.get_section_by_name(".symtab")
        maps = sorted(s.name for s in symtab.iter_symbols()
                      if maps_sec_index is not None and s["st_shndx"] == maps_sec_index) if symtab else []
        missing = sorted(set(required) - set(maps))
        if missing:
            problems.append(f"maps missing: {', '.join(missing)}")
        btf = elf.get_section_by_name(".BTF") is not None
        if not btf:
            problems.append("no BTF (.BTF section): compile with -g")
        return ObjectReport(path=path, size=path.stat().st_size,
                            instructions=(prog.data_size // 8) if prog else 0,
                            license=lic, maps=maps, btf=btf, problems=problems)


def require_object(path: Path = OBJECT) -> Path:
    if not path.exists():
        raise PrerequisiteError(f"{path} does not exist; build it first with: xdplb build")
    return path
