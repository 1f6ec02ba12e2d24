# SPDX-License-Identifier: Apache-2.0
"""ctypes binding to libbpf.so: every call used by xdplb, with argtypes and restype.

libbpf's own log goes to a buffer instead of stderr; a failed load raises
VerifierError carrying the verifier's log so the CLI can show its relevant tail.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from pathlib import Path

from .errors import BpfError, PrerequisiteError, VerifierError

c_int, c_uint32, c_uint64, c_void_p, c_char_p = (
    ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_char_p)

BPF_ANY = 0
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_XDP = 6
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BPF_F_MMAPABLE = 1 << 10
BPF_OBJ_NAME_LEN = 16
PRINT_BUFFER_BYTES = 4 << 20  # room for a verifier log of the largest size libbpf asks for


class TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t), ("data_in", c_void_p), ("data_out", c_void_p),
        ("data_size_in", c_uint32), ("data_size_out", c_uint32),
        ("ctx_in", c_void_p), ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32), ("ctx_size_out", c_uint32),
        ("retval", c_uint32), ("repeat", c_int), ("duration", c_uint32),
        ("flags", c_uint32), ("cpu", c_uint32), ("batch_size", c_uint32),
    ]


def array_stride(value_size: int) -> int:
    """Bytes between two values of a mappable array map."""
    return (value_size + 7) // 8 * 8


class MapCreateOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t), ("btf_fd", c_uint32), ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32), ("btf_vmlinux_value_type_id", c_uint32),
        ("inner_map_fd", c_uint32), ("map_flags", c_uint32), ("map_extra", c_uint64),
        ("numa_node", c_uint32), ("map_ifindex", c_uint32),
    ]


class ProgInfo(ctypes.Structure):
    """The leading part of struct bpf_prog_info (the kernel fills what fits)."""
    _fields_ = [
        ("type", c_uint32), ("id", c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", c_uint32), ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64), ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64), ("created_by_uid", c_uint32), ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32), ("gpl_compatible", c_uint32),
        ("netns_dev", c_uint64), ("netns_ino", c_uint64),
        ("nr_jited_ksyms", c_uint32), ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64), ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32), ("func_info_rec_size", c_uint32), ("func_info", c_uint64),
        ("nr_func_info", c_uint32), ("nr_line_info", c_uint32), ("line_info", c_uint64),
        ("jited_line_info", c_uint64), ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32), ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32), ("prog_tags", c_uint64),
        ("run_time_ns", c_uint64), ("run_cnt", c_uint64),
    ]


class MapInfo(ctypes.Structure):
    """The leading part of struct bpf_map_info."""
    _fields_ = [
        ("type", c_uint32), ("id", c_uint32), ("key_size", c_uint32),
        ("value_size", c_uint32), ("max_entries", c_uint32), ("map_flags", c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

# name: (restype, argtypes)
_SIGNATURES = {
    "libbpf_set_print": (c_void_p, [_PRINT_FN]),
    "libbpf_num_possible_cpus": (c_int, []),
    "libbpf_major_version": (c_uint32, []),
    "libbpf_minor_version": (c_uint32, []),
    "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint32]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__reuse_fd": (c_int, [c_void_p, c_int]),
    "bpf_map__type": (c_int, [c_void_p]),
    "bpf_map__key_size": (c_uint32, [c_void_p]),
    "bpf_map__value_size": (c_uint32, [c_void_p]),
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_lookup_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                     ctypes.POINTER(c_uint32), c_void_p]),
    "bpf_map_update_batch": (c_int, [c_int, c_void_p, c_void_p, ctypes.POINTER(c_uint32), c_void_p]),
    "bpf_map_create": (c_int, [c_int, c_char_p, c_uint32, c_uint32, c_uint32, ctypes.POINTER(MapCreateOpts)]),
    "bpf_obj_pin": (c_int, [c_int, c_char_p]),
    "bpf_obj_get": (c_int, [c_char_p]),
    "bpf_prog_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_map_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(c_uint32)]),
    "bpf_prog_test_run_opts": (c_int, [c_int, ctypes.POINTER(TestRunOpts)]),
    "bpf_prog_load": (c_int, [c_int, c_char_p, c_char_p, c_char_p, ctypes.c_size_t, c_void_p]),
}


def _bundled_library() -> Path | None:
    """libbpf built from the libbpf/ submodule by `make build`, if there is one."""
    root = Path(__file__).resolve().parents[2]
    candidate = root / "build" / "libbpf" / "libbpf.so.1"
    return candidate if candidate.exists() else None


class Libbpf:
    """One loaded libbpf.so with its log captured."""

    def __init__(self, path: str | None = None):
        path = path or os.environ.get("XDPLB_LIBBPF") or _bundled_library()
        if path is None:
            path = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            self.lib = ctypes.CDLL(str(path), use_errno=True)
        except OSError as exc:
            raise PrerequisiteError(
                f"cannot load libbpf ({exc}); install it with: apt-get install libbpf1") from exc
        self.path = str(path)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self._libc = ctypes.CDLL(None)
        self._libc.vsnprintf.argtypes = [c_char_p, ctypes.c_size_t, c_char_p, c_void_p]
        self.log: list[str] = []
        self._print_buf = ctypes.create_string_buffer(PRINT_BUFFER_BYTES)
        self._print_fn = _PRINT_FN(self._on_print)  # kept alive as long as self
        self.lib.libbpf_set_print(self._print_fn)

    def _on_print(self, level: int, fmt: bytes, args: int) -> int:
        # One buffer for every message: the verifier's log comes as a single message of
        # up to megabytes, and its last lines say why the program was rejected.
        self._libc.vsnprintf(self._print_buf, len(self._print_buf), fmt, args)
        self.log.append(self._print_buf.value.decode(errors="replace"))
        return 0

    @property
    def version(self) -> str:
        return f"{self.lib.libbpf_major_version()}.{self.lib.libbpf_minor_version()}"

    def __getattr__(self, name: str):
        return getattr(self.lib, name)

    # Helpers that turn libbpf's "negative errno or NULL+errno" into exceptions.
    def check(self, rc: int, what: str) -> int:
        if rc < 0:
            err = -rc  # libbpf >= 1.0 returns -errno
            raise BpfError(f"{what}: {os.strerror(err)}", errno=err)
        return rc

    def open_object(self, path: str) -> int:
        """Opens an object without loading it; returns the bpf_object pointer."""
        self.log.clear()
        obj = self.lib.bpf_object__open_file(path.encode(), None)
        if not obj:
            err = ctypes.get_errno()
            raise BpfError(f"cannot open {path}: {os.strerror(err)}; rebuild it with: xdplb build",
                           errno=err)
        return obj

    def load_opened(self, obj: int) -> int:
        """Loads an opened object (closing it on failure)."""
        rc = self.lib.bpf_object__load(obj)
        if rc < 0:
            log = list(self.log)
            self.lib.bpf_object__close(obj)
            raise VerifierError.from_log(-rc, log)
        return obj

    def load_object(self, path: str, max_entries: dict[str, int]) -> int:
        """Opens and loads an object; returns the bpf_object pointer."""
        obj = self.open_object(path)
        for name, size in max_entries.items():
            m = self.lib.bpf_object__find_map_by_name(obj, name.encode())
            if not m or self.lib.bpf_map__set_max_entries(m, size) < 0:
                self.lib.bpf_object__close(obj)
                raise BpfError(f"cannot size map {name} to {size} entries")
        return self.load_opened(obj)

    def load_xdp_insns(self, name: str, insns: bytes, what: str) -> int:
        """Loads an XDP program given as raw instructions (GPL); returns its fd. `what`
        names the program in the error."""
        fd = self.lib.bpf_prog_load(BPF_PROG_TYPE_XDP, name.encode(), b"GPL", insns, len(insns) // 8, None)
        return self.check(fd, what)

    def map_fd(self, obj: int, name: str) -> int:
        m = self.lib.bpf_object__find_map_by_name(obj, name.encode())
        if not m:
            raise BpfError(f"the object has no map {name}: rebuild it with: xdplb build")
        return self.lib.bpf_map__fd(m)

    def prog_fd(self, obj: int, name: str) -> int:
        p = self.lib.bpf_object__find_program_by_name(obj, name.encode())
        if not p:
            raise BpfError(f"the object has no program {name}: rebuild it with: xdplb build")
        return self.lib.bpf_program__fd(p)

    def update(self, fd: int, key, value, flags: int = BPF_ANY) -> None:
        rc = self.lib.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags)
        self.check(rc, "map update")

    def lookup(self, fd: int, key, value) -> bool:
        rc = self.lib.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
        if rc == -errno.ENOENT:
            return False
        self.check(rc, "map lookup")
        return True

    def delete(self, fd: int, key) -> bool:
        rc = self.lib.bpf_map_delete_elem(fd, ctypes.byref(key))
        if rc == -errno.ENOENT:
            return False
        self.check(rc, "map delete")
        return True

    def keys(self, fd: int, key_type):
        """Iterates the keys of a hash map."""
        prev, key = None, key_type()
        while True:
            rc = self.lib.bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None,
                                               ctypes.byref(key))
            if rc < 0:
                return
            yield key
            prev, key = key, key_type()

    def array_values(self, fd: int, value_type, count: int):
        """The first `count` values of an array map in one batch (index order), as a
        ctypes array: no Python object per value until one is indexed (a 4096-entry map
        in microseconds, not milliseconds)."""
        keys = (c_uint32 * count)()
        values = (value_type * count)()
        token = c_uint32()
        n = c_uint32(count)
        rc = self.lib.bpf_map_lookup_batch(fd, None, ctypes.byref(token), keys, values, ctypes.byref(n), None)
        if rc < 0 and rc != -errno.ENOENT:
            self.check(rc, "array batch lookup")
        if n.value != count:
            raise BpfError(f"array batch lookup: {n.value} of {count} values read")
        return values

    @staticmethod
    def map_memory(fd: int, value_size: int, entries: int) -> mmap.mmap:
        """A BPF_F_MMAPABLE array map's values, shared with the kernel: entry i at
        i * stride, the stride being value_size rounded up to 8 (as the kernel lays
        them out)."""
        return mmap.mmap(fd, array_stride(value_size) * entries, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def obj_info(self, fd: int, info):
        size = c_uint32(ctypes.sizeof(info))
        self.check(self.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
                   "bpf_obj_get_info_by_fd")
        return info

    def prog_map_ids(self, prog_fd: int) -> list[int]:
        info = self.obj_info(prog_fd, ProgInfo())
        ids = (c_uint32 * info.nr_map_ids)()
        info2 = ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ctypes.addressof(ids))
        self.obj_info(prog_fd, info2)
        return list(ids)

    def create_array(self, name: str, value_size: int, entries: int, flags: int = BPF_F_MMAPABLE) -> int:
        """An array map like the inner maps of the data plane (mappable, as their
        templates in bpf/maps.h are: an inner map must match its template)."""
        opts = MapCreateOpts(sz=ctypes.sizeof(MapCreateOpts), map_flags=flags)
        fd = self.lib.bpf_map_create(BPF_MAP_TYPE_ARRAY, name.encode(), 4, value_size, entries,
                                     ctypes.byref(opts))
        return self.check(fd, f"create map {name}")

    def update_batch(self, fd: int, keys, values, count: int) -> None:
        n = c_uint32(count)
        self.check(self.lib.bpf_map_update_batch(fd, keys, values, ctypes.byref(n), None),
                   "map batch update")

    def batches(self, fd: int, key_type, value_type, batch: int = 4096):
        """A hash map's entries, `batch` per system call: (keys, values, n) with the
        first n entries of each buffer valid until the next batch. A map changing
        meanwhile may give an entry twice or not at all, as iterating keys does."""
        keys, values = (key_type * batch)(), (value_type * batch)()
        token = ctypes.create_string_buffer(ctypes.sizeof(key_type))  # the kernel's cursor between calls
        start = None
        while True:
            n = c_uint32(batch)
            rc = self.lib.bpf_map_lookup_batch(fd, start, token, keys, values, ctypes.byref(n), None)
            if n.value:
                yield keys, values, n.value
            if rc == -errno.ENOENT:
                return
            self.check(rc, "map batch lookup")
            start = token

    def items(self, fd: int, key_type, value_type, batch: int = 4096):
        """Every (key, value) of a hash map (see batches), each a copy."""
        for keys, values, n in self.batches(fd, key_type, value_type, batch):
            for i in range(n):
                yield key_type.from_buffer_copy(keys[i]), value_type.from_buffer_copy(values[i])

    def test_run(self, prog_fd: int, data: bytes, repeat: int = 1, ctx: bytes | None = None,
                 flags: int = 0, batch_size: int = 0) -> tuple[int, bytes, int]:
        """Runs a program on one packet: (return value, output packet, ns per run).
        In live-frames mode the frames leave for real and there is no output."""
        live = bool(flags & BPF_F_TEST_XDP_LIVE_FRAMES)
        out = ctypes.create_string_buffer(max(len(data), 1) + 512)
        opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_size_in=len(data),
                           data_size_out=0 if live else len(out), repeat=repeat, flags=flags,
                           batch_size=batch_size)
        inbuf = ctypes.create_string_buffer(data, len(data))
        opts.data_in = ctypes.addressof(inbuf)
        if not live:
            opts.data_out = ctypes.addressof(out)
        if ctx is not None:
            ctxbuf = ctypes.create_string_buffer(ctx, len(ctx))
            opts.ctx_in = ctypes.addressof(ctxbuf)
            opts.ctx_size_in = len(ctx)
        self.check(self.lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
        return opts.retval, b"" if live else out.raw[:opts.data_size_out], opts.duration


_instance: Libbpf | None = None


def libbpf() -> Libbpf:
    """The process's one libbpf handle, loaded on first use."""
    global _instance
    if _instance is None:
        _instance = Libbpf()
    return _instance
