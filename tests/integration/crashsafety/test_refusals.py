"""What libcare-ctl says to init and to a kernel thread: a refusal naming what they are."""

from __future__ import annotations

import os

import pytest
from crash_helpers import ctl


def kernel_thread() -> int | None:
    """A kernel thread of this pid namespace: kthreadd (ppid 0, no command line) or a child of it."""
    for name in sorted(os.listdir("/proc"), key=lambda n: (len(n), n)):
        if not name.isdigit() or name == "1":
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as stream:
                cmdline = stream.read()
            with open(f"/proc/{name}/stat", "rb") as stream:
                stat = stream.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        if not cmdline and (ppid == 0 or ppid == 2):
            return int(name)
    return None


def test_pid_1_is_refused(tmp_path):
    for command in (["patch", "-p", "1", "--no-verify", str(tmp_path)], ["unpatch", "-p", "1"]):
        result = ctl(*command)
        assert result.returncode != 0
        action = command[0]
        assert f"refusing to {action} pid 1 (init)" in result.stdout + result.stderr, result.stdout + result.stderr


def test_a_kernel_thread_is_named_so(tmp_path):
    pid = kernel_thread()
    if pid is None:
        pytest.skip("no kernel thread visible in this pid namespace")
    for command in (["patch", "-p", str(pid), "--no-verify", str(tmp_path)], ["unpatch", "-p", str(pid)],
                    ["info", "-p", str(pid)]):
        result = ctl(*command)
        assert f"process {pid} is a kernel thread" in result.stdout + result.stderr, result.stdout + result.stderr
