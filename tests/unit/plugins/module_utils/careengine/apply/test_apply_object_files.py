"""Symbol lookup with versions against the real libc.so.6, CFI rules, search order."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from plugins.module_utils.careengine.apply.object_files import (
    STT_GNU_IFUNC,
    ObjectFile,
    gnu_hash,
    search_order,
    split_version,
)
from plugins.module_utils.careengine.process import MappedObject

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


@pytest.fixture(scope="module")
def libc():
    if not os.path.exists(LIBC):
        pytest.skip("no glibc here")
    with open(LIBC, "rb") as stream:
        yield ObjectFile(LIBC, stream)


@pytest.mark.parametrize(("name", "expected"), [
    ("puts@GLIBC_2.2.5", ("puts", "GLIBC_2.2.5")),
    ("memcpy@@GLIBC_2.14", ("memcpy", "GLIBC_2.14")),
    ("demo_value", ("demo_value", None)),
])
def test_split_version(name, expected):
    assert split_version(name) == expected


def test_gnu_hash_reference_values():
    # Values from the GNU hash definition (h = h * 33 + c, starting at 5381).
    assert gnu_hash(b"") == 5381
    assert gnu_hash(b"printf") == 0x156B2BB8


def test_versioned_lookup_binds_to_that_version(libc):
    old = libc.lookup_dynamic("memcpy", "GLIBC_2.2.5")
    new = libc.lookup_dynamic("memcpy", "GLIBC_2.14")
    assert old is not None and new is not None
    assert old.vaddr != new.vaddr
    assert (old.version, new.version) == ("GLIBC_2.2.5", "GLIBC_2.14")
    # An unversioned reference gets the default (newest) version.
    assert libc.lookup_dynamic("memcpy", None).vaddr == new.vaddr


def test_lookup_of_missing_names_and_versions(libc):
    assert libc.lookup_dynamic("puts", "GLIBC_2.2.5") is not None
    assert libc.lookup_dynamic("puts", "GLIBC_99") is None
    assert libc.lookup_dynamic("no_such_symbol_here", None) is None


def test_ifunc_and_data_symbols(libc):
    assert libc.lookup_dynamic("strlen", "GLIBC_2.2.5").sym_type == STT_GNU_IFUNC
    stderr = libc.lookup_dynamic("stderr", "GLIBC_2.2.5")
    assert stderr.sym_type == 1 and stderr.size == 8


def test_soname_and_needed(libc):
    assert libc.soname == "libc.so.6"
    assert any(name.startswith("ld-linux") for name in libc.needed)


def test_frame_rules_through_eh_frame_hdr(libc):
    puts = libc.lookup_dynamic("puts", None)
    entry = libc.frame_rule(puts.vaddr)
    assert (entry.cfa_register, entry.cfa_offset) == (7, 8)     # CFA = rsp + 8 at entry
    assert dict(entry.saved)[16] == -8                            # return address at CFA - 8
    inside = libc.frame_rule(puts.vaddr + puts.size - 2)
    assert inside is not None and dict(inside.saved)[16] == -8
    assert libc.frame_rule(0x10) is None


def _mapped(path: str, start: int) -> MappedObject:
    return MappedObject(path, None, start, start, start + 0x1000, (), "ET_DYN")


def test_search_order_follows_needed_breadth_first():
    exe, liba, libb, libc_, ld, extra = (_mapped(p, i * 0x10000) for i, p in enumerate(
        ["/bin/app", "/lib/liba.so", "/lib/libb.so.1", "/lib/libc.so.6", "/lib/ld-linux-x86-64.so.2", "/x/plugin.so"]))
    files = {
        exe.start: SimpleNamespace(soname=None, needed=("libb.so.1", "liba.so")),
        liba.start: SimpleNamespace(soname="liba.so", needed=("libc.so.6",)),
        libb.start: SimpleNamespace(soname="libb.so.1", needed=("libc.so.6",)),
        libc_.start: SimpleNamespace(soname="libc.so.6", needed=("ld-linux-x86-64.so.2",)),
        ld.start: SimpleNamespace(soname="ld-linux-x86-64.so.2", needed=()),
        extra.start: SimpleNamespace(soname=None, needed=()),
    }
    objects = [extra, ld, libc_, liba, libb, exe]          # maps order differs from link order
    order = search_order(objects, exe, files)
    assert [o.path for o in order] == ["/bin/app", "/lib/libb.so.1", "/lib/liba.so", "/lib/libc.so.6",
                                       "/lib/ld-linux-x86-64.so.2", "/x/plugin.so"]


def test_preloaded_libraries_come_right_after_the_executable():
    exe, libc_, preload = (_mapped(p, i * 0x10000) for i, p in enumerate(
        ["/bin/app", "/lib/libc.so.6", "/usr/lib/libstdbuf.so"]))
    files = {exe.start: SimpleNamespace(soname=None, needed=("libc.so.6",)),
             libc_.start: SimpleNamespace(soname="libc.so.6", needed=()),
             preload.start: SimpleNamespace(soname=None, needed=("libc.so.6",))}
    order = search_order([libc_, preload, exe], exe, files, ("/usr/lib/libstdbuf.so",))
    assert [o.path for o in order] == ["/bin/app", "/usr/lib/libstdbuf.so", "/lib/libc.so.6"]
