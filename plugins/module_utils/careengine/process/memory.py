"""Reading and writing a patient's memory.

Reads use ``process_vm_readv`` (one system call for many ranges), falling back to
``/proc/PID/mem``. Writes use ``pwrite`` on ``/proc/PID/mem``, which the kernel lets a
tracer use on read-only text; the descriptor is cached per pid.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections import OrderedDict

from ..errors import PermissionDenied, ProcessError, ProcessGone
from .maps import live_thread

IOV_MAX = 1024
_MEM_FD_CACHE_SIZE = 64


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_process_vm_readv.restype = ctypes.c_ssize_t

# pid -> (fd of /proc/PID/mem opened read-write); least recently used first.
_mem_fds: OrderedDict[int, int] = OrderedDict()
# pid -> a live thread to address the memory through, for processes whose main thread exited.
_task_for_pid: dict[int, int] = {}


def _target(pid: int) -> int:
    return _task_for_pid.get(pid, pid)


def _switch_to_live_thread(pid: int) -> bool:
    """After the main thread of ``pid`` is found gone: use another thread; False if none."""
    if pid in _task_for_pid:
        return False
    tid = live_thread(pid)
    if tid is None:
        return False
    fd = _mem_fds.pop(pid, None)
    if fd is not None:
        os.close(fd)
    _task_for_pid[pid] = tid
    return True


def _raise_for_errno(pid: int, code: int, what: str) -> None:
    if code == errno.ESRCH:
        raise ProcessGone(f"process {pid} does not exist")
    if code == errno.EPERM or code == errno.EACCES:
        raise PermissionDenied(f"may not access the memory of process {pid}: run as root or with CAP_SYS_PTRACE")
    raise ProcessError(f"{what} in process {pid} failed: {errno.errorcode.get(code, code)} ({os.strerror(code)})")


def _vm_readv(pid: int, ranges: list[tuple[int, int]], buffers: list[ctypes.Array]) -> int:
    """One ``process_vm_readv`` call; the byte count read, or -errno."""
    count = len(ranges)
    local = (_IoVec * count)()
    remote = (_IoVec * count)()
    for index, ((address, size), buffer) in enumerate(zip(ranges, buffers, strict=True)):
        local[index].iov_base = ctypes.addressof(buffer)
        local[index].iov_len = size
        remote[index].iov_base = address
        remote[index].iov_len = size
    done = _process_vm_readv(_target(pid), local, count, remote, count, 0)
    if done < 0:
        code = ctypes.get_errno()
        if code == errno.ESRCH and _switch_to_live_thread(pid):
            return _vm_readv(pid, ranges, buffers)
        return -code
    return done


def _read_proc_mem(pid: int, address: int, size: int) -> bytes | None:
    """``size`` bytes at ``address`` through ``/proc/PID/mem``; None if not all readable."""
    fd = _mem_fd(pid)
    try:
        data = os.pread(fd, size, address)
    except OSError as exc:
        if exc.errno in (errno.EIO, errno.EFAULT):
            return None
        _raise_for_errno(pid, exc.errno or 0, f"reading {size} bytes at {address:#x}")
    if len(data) != size:
        if not data:
            if not os.path.exists(f"/proc/{pid}"):
                raise ProcessGone(f"process {pid} does not exist")
            if _switch_to_live_thread(pid):
                return _read_proc_mem(pid, address, size)
        return None
    return data


def read_ranges_lenient(pid: int, ranges: list[tuple[int, int]]) -> list[bytes | None]:
    """The bytes of each ``(address, size)`` range, None for a range that is not readable.

    As few ``process_vm_readv`` calls as possible: one per 1024 ranges when all are
    readable. The kernel stops at the first unreadable range; the rest are read again.
    """
    results: list[bytes | None] = [None] * len(ranges)
    index = 0
    while index < len(ranges):
        batch = ranges[index:index + IOV_MAX]
        sizes = [size for _, size in batch]
        # Zero-length ranges need no read.
        buffers = [ctypes.create_string_buffer(max(size, 1)) for size in sizes]
        done = _vm_readv(pid, batch, buffers)
        if done < 0 and -done not in (errno.EFAULT, errno.ENOMEM, errno.EIO):
            if -done in (errno.ENOSYS, errno.EPERM):
                # No process_vm_readv here (or forbidden by policy): the slow path.
                for offset, (address, size) in enumerate(batch):
                    results[index + offset] = _read_proc_mem(pid, address, size) if size else b""
                index += len(batch)
                continue
            _raise_for_errno(pid, -done, f"reading {len(batch)} ranges")
        done = max(done, 0)
        advanced = 0
        for offset, size in enumerate(sizes):
            if done >= size:
                results[index + offset] = buffers[offset].raw[:size]
                done -= size
                advanced += 1
                continue
            # This range failed (possibly part way): try it alone through /proc/PID/mem,
            # which can also read pages process_vm_readv refuses, then go on after it.
            address = batch[offset][0]
            results[index + offset] = _read_proc_mem(pid, address, size)
            advanced += 1
            break
        index += advanced
    return results


def read_ranges(pid: int, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each ``(address, size)`` range, read with one ``process_vm_readv``.

    Used to read the stacks of all threads at once. Raises ProcessError if a range is
    not readable.
    """
    results = read_ranges_lenient(pid, ranges)
    for (address, size), data in zip(ranges, results, strict=True):
        if data is None:
            raise ProcessError(f"cannot read {size} bytes at {address:#x} in process {pid}: not mapped or not readable")
    return results  # type: ignore[return-value]


def read_memory(pid: int, address: int, size: int) -> bytes:
    """``size`` bytes of process ``pid``'s memory at ``address``."""
    if size == 0:
        return b""
    buffer = ctypes.create_string_buffer(size)
    done = _vm_readv(pid, [(address, size)], [buffer])
    if done == size:
        return buffer.raw
    if done < 0 and -done not in (errno.EFAULT, errno.ENOMEM, errno.EIO, errno.ENOSYS, errno.EPERM):
        _raise_for_errno(pid, -done, f"reading {size} bytes at {address:#x}")
    data = _read_proc_mem(pid, address, size)
    if data is None:
        raise ProcessError(f"cannot read {size} bytes at {address:#x} in process {pid}: not mapped or not readable")
    return data


def _open_mem(pid: int) -> int:
    try:
        return os.open(f"/proc/{_target(pid)}/mem", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessGone(f"process {pid} does not exist") from None
    except PermissionError:
        raise PermissionDenied(
            f"may not open /proc/{pid}/mem: run as root or with CAP_SYS_PTRACE"
        ) from None
    except OSError as exc:
        _raise_for_errno(pid, exc.errno or 0, "opening /proc/PID/mem")
        raise


def _mem_fd(pid: int) -> int:
    fd = _mem_fds.get(pid)
    if fd is not None:
        _mem_fds.move_to_end(pid)
        return fd
    fd = _open_mem(pid)
    _mem_fds[pid] = fd
    while len(_mem_fds) > _MEM_FD_CACHE_SIZE:
        _, old_fd = _mem_fds.popitem(last=False)
        os.close(old_fd)
    return fd


def open_memory(pid: int) -> None:
    """Open (and cache) ``/proc/PID/mem`` now, before a stop: writes during it need no open."""
    _mem_fd(pid)


def forget_process(pid: int) -> None:
    """Close the cached ``/proc/PID/mem`` descriptor of ``pid`` (if any)."""
    _task_for_pid.pop(pid, None)
    fd = _mem_fds.pop(pid, None)
    if fd is not None:
        os.close(fd)


def write_memory(pid: int, address: int, data: bytes) -> None:
    """Write ``data`` at ``address`` in process ``pid``; works on read-only text too."""
    if not data:
        return
    for attempt in range(2):
        fd = _mem_fd(pid)
        try:
            written = os.pwrite(fd, data, address)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EFAULT):
                raise ProcessError(
                    f"cannot write {len(data)} bytes at {address:#x} in process {pid}: not mapped"
                ) from None
            _raise_for_errno(pid, exc.errno or 0, f"writing {len(data)} bytes at {address:#x}")
            raise
        if written == len(data):
            return
        # 0 bytes: the cached descriptor belongs to an address space that is gone
        # (the pid was reused, the process exec'd, or its main thread exited). Reopen once.
        forget_process(pid)
        if attempt == 0 and written == 0:
            _switch_to_live_thread(pid)
            continue
        if not os.path.exists(f"/proc/{pid}"):
            raise ProcessGone(f"process {pid} does not exist")
        raise ProcessError(f"short write at {address:#x} in process {pid}: {written} of {len(data)} bytes")
