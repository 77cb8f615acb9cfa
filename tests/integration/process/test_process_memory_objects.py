"""Memory access and mapped objects of real processes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from plugins.module_utils.careengine.errors import ProcessError, ProcessGone
from plugins.module_utils.careengine.process import (
    PATCH_HEADER_SIZE,
    StoppedProcess,
    find_applied_patches,
    mapped_objects,
    read_maps,
    read_memory,
    read_ranges,
    read_ranges_lenient,
    write_memory,
)

PAGE = 4096


def readelf_build_id(path: str) -> str:
    output = subprocess.run(["readelf", "-n", path], capture_output=True, text=True, check=True).stdout
    return re.search(r"Build ID: ([0-9a-f]+)", output).group(1)


def symbol_value(path: str, name: str) -> int:
    with open(path, "rb") as stream:
        return ELFFile(stream).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


def dead_pid(program: str) -> int:
    process = subprocess.Popen([program], stdout=subprocess.DEVNULL)
    process.kill()
    process.wait()
    return process.pid


def test_read_ranges_matches_single_reads(threads_program):
    running = threads_program(4)
    maps = [m for m in read_maps(running.pid) if m.readable and not m.path.startswith(("[vvar", "[vsyscall"))]
    ranges = [(m.start + (i * 24) % m.size, 64) for i, m in enumerate(maps)] * 60  # > 1024 ranges
    assert len(ranges) > 1024
    bulk = read_ranges(running.pid, ranges)
    assert bulk[: len(maps)] == [read_memory(running.pid, address, size) for address, size in ranges[: len(maps)]]
    assert [len(data) for data in bulk] == [64] * len(ranges)


def test_unreadable_range_is_reported_and_others_still_read(threads_program):
    running = threads_program(1)
    counters = running.address("counters")
    unmapped = 0x1000  # below mmap_min_addr: never mapped
    ranges = [(counters, 8), (unmapped, 16), (counters, 16)]
    lenient = read_ranges_lenient(running.pid, ranges)
    assert lenient[1] is None
    assert lenient[0] is not None and lenient[2] is not None and len(lenient[2]) == 16
    with pytest.raises(ProcessError, match="0x1000"):
        read_ranges(running.pid, ranges)
    with pytest.raises(ProcessError, match="0x1000"):
        read_memory(running.pid, unmapped, 8)


def test_memory_of_dead_process(programs):
    pid = dead_pid(programs["loop"])
    with pytest.raises(ProcessGone):
        read_memory(pid, 0x400000, 8)
    with pytest.raises(ProcessGone):
        write_memory(pid, 0x400000, b"x")
    with pytest.raises(ProcessGone, match=f"process {pid} does not exist"):
        read_maps(pid)
    with pytest.raises(ProcessGone):
        mapped_objects(pid)


def test_write_memory_of_running_process(threads_program):
    running = threads_program(1)
    usr1 = running.address("usr1")
    write_memory(running.pid, usr1, (12345).to_bytes(8, "little"))
    assert int.from_bytes(read_memory(running.pid, usr1, 8), "little") == 12345


def test_build_ids_and_load_bias_match_the_files(programs, threads_program):
    running = threads_program(2)
    objects = {os.path.basename(obj.path): obj for obj in mapped_objects(running.pid)}
    executable = objects["threads"]
    assert executable.build_id == readelf_build_id(programs["threads"])
    assert executable.elf_type == "ET_DYN"
    assert executable.vaddr_to_address(symbol_value(programs["threads"], "resolver_like")) == running.address("resolver")
    libc = objects["libc.so.6"]
    assert libc.build_id == readelf_build_id(os.path.realpath(libc.path))
    assert libc.start <= libc.load_bias + 0x1000 < libc.end
    assert all(mapping.inode == libc.mappings[0].inode for mapping in libc.mappings)
    # Non-ELF file mappings are skipped, objects keep maps order.
    starts = [obj.start for obj in mapped_objects(running.pid)]
    assert starts == sorted(starts)


def test_non_pie_executable(programs, spawn):
    running = spawn([programs["loop_nopie"]])
    running.readline()
    objects = mapped_objects(running.pid)
    executable = next(obj for obj in objects if obj.path == programs["loop_nopie"])
    assert executable.elf_type == "ET_EXEC"
    assert executable.load_bias == 0
    assert executable.build_id == readelf_build_id(programs["loop_nopie"])


def test_deleted_executable_keeps_its_build_id(programs, spawn, tmp_path):
    copy = tmp_path / "doomed"
    shutil.copy(programs["threads"], copy)
    running = spawn([str(copy), "2", "sleep"])
    running.wait_for("ready")
    expected = readelf_build_id(str(copy))
    copy.unlink()
    copy.write_bytes(b"not an ELF file any more")
    executable = next(obj for obj in mapped_objects(running.pid) if obj.path == str(copy))
    assert executable.deleted
    assert executable.build_id == expected


def test_applied_patch_is_found_in_anonymous_memory(threads_program):
    running = threads_program(1)
    header = b"KPATCH1\0" + bytes(range(256)) * 3
    with StoppedProcess(running.pid) as patient:
        address = patient.mmap(0, 2 * PAGE, 7, 0x22)
        patient.write(address, header)
        decoy = patient.mmap(0, PAGE, 3, 0x22)
        patient.write(decoy, b"KPATCH0\0")
    found = find_applied_patches(running.pid, read_maps(running.pid))
    assert [(mapping.start, data) for mapping, data in found] == [(address, header[:PATCH_HEADER_SIZE])]
    assert decoy != address


def test_inaccessible_pages_are_read_and_written_through_proc_mem(threads_program):
    running = threads_program(1)
    with StoppedProcess(running.pid) as patient:
        address = patient.mmap(0, 2 * PAGE, 3, 0x22)
        patient.write(address, b"A" * 16)
        patient.write(address + PAGE, b"B" * 16)
        patient.mprotect(address + PAGE, PAGE, 0)  # PROT_NONE: process_vm_readv refuses it
        ranges = [(address, 16), (address + PAGE, 16), (address, 0)]
        assert read_ranges(running.pid, ranges) == [b"A" * 16, b"B" * 16, b""]
        write_memory(running.pid, address + PAGE, b"C" * 4)
        assert read_memory(running.pid, address + PAGE, 8) == b"CCCCBBBB"
        patient.munmap(address, 2 * PAGE)


def test_cannot_stop_ourselves():
    with pytest.raises(ProcessError, match="itself"):
        StoppedProcess(os.getpid()).stop()


def test_executable_in_another_mount_namespace(programs, spawn, tmp_path):
    """The file is not visible from here at the path the patient maps it from."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is needed")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    script = f"mount -t tmpfs none {hidden} && cp {programs['threads']} {hidden}/app && exec {hidden}/app 2 sleep"
    running = spawn(["unshare", "--mount", "sh", "-c", script])
    try:
        running.wait_for("ready", timeout=5)
    except BaseException:
        pytest.skip("cannot create a mount namespace here")
    assert not (hidden / "app").exists()
    executable = next(obj for obj in mapped_objects(running.pid) if obj.path == f"{hidden}/app")
    assert executable.build_id == readelf_build_id(programs["threads"])


def test_build_id_is_read_from_memory_not_from_the_file(threads_program, programs):
    running = threads_program(1)
    executable = next(obj for obj in mapped_objects(running.pid) if obj.path == programs["threads"])
    real = bytes.fromhex(executable.build_id)
    first = executable.mappings[0]
    where = first.start + read_memory(running.pid, first.start, first.size).index(real)
    fake = bytes(reversed(real))
    write_memory(running.pid, where, fake)  # read-only page: written through /proc/PID/mem
    try:
        again = next(obj for obj in mapped_objects(running.pid) if obj.path == programs["threads"])
        assert again.build_id == fake.hex()
    finally:
        write_memory(running.pid, where, real)
    assert next(obj for obj in mapped_objects(running.pid) if obj.path == programs["threads"]).build_id == real.hex()
