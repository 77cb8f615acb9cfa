"""nginx under the service: the binary upgrade (``kill -USR2``) re-executes the master, and
the new master and its workers serve the fixed answers; every request of the load counted,
not one failed.

The upgrade is nginx's own procedure: USR2 to the master (a new master from the binary, with
its workers, beside the old generation), WINCH to the old master (its workers finish what
they serve and exit), QUIT to it. A worker told to stop closes its idle keep-alive
connections at once, whatever the client is sending on them (``ngx_close_idle_connections``;
no setting or signal order avoids it): a request that crosses that close gets a reset or an
EOF before any byte of its answer. The load client sends such a request again, once, on a
new connection, as HTTP clients do with idempotent requests (RFC 9110 section 9.2.2), and
counts it as retried; anything else is a failure. Every answer names its worker (an
``X-Worker`` header), so a retry is allowed only for a request lost on a connection of an old
worker (one lost on a new worker's connection could hide a crash). The same upgrade of the
same binary without the service (``test_binary_upgrade_without_the_service``) shows that the
retries are nginx's own.

Reuses the real-project harness of ``tests/integration/realproject/test_nginx.py`` and the
server and patch its ``build_patch.sh`` leaves in the cache (built here if missing), under
the heavy-work lock. Figures in ``tests/output/realproject-nginx/upgrade-*.json``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from watch_helpers import ROOT, Service, until

sys.path.insert(0, str(ROOT / "tests" / "integration" / "realproject"))

import test_nginx as harness  # noqa: E402

from plugins.module_utils.careengine.apply.object_files import ObjectFile  # noqa: E402

HEAVY_LOCK = "/tmp/libcare-heavy.lock"
JMP = b"\xe9"
PHASES = ("before", "upgrade", "drain", "after")
WORKER_HEADER = "X-Worker"      # every answer names the worker that sent it


@pytest.fixture(scope="module")
def nginx_build():
    if os.geteuid() != 0:
        pytest.skip("the service needs root")
    with open(HEAVY_LOCK, "a") as heavy:
        fcntl.flock(heavy, fcntl.LOCK_EX)
        with harness.NGINX.locked():
            if not harness.SERVER.exists() or not list(harness.PATCHROOT.glob("*.kpatch")):
                harness.NGINX.prepare(timeout=900)
                run = harness.NGINX.run(["bash", str(harness.SCRIPTS / "build_patch.sh")], timeout=1800)
                assert run.returncode == 0, run.stderr[-4000:]
            yield harness.SERVER, harness.PATCHROOT


class UpgradeLoad(harness.Load):
    """The harness's load, with the probe among the requests (every answer must be
    ``expected``, the answering worker counted), retries of requests lost on a reused
    connection, and phases."""

    def __init__(self, nginx: harness.Nginx, expected: str) -> None:
        super().__init__(nginx, harness.CLIENT_THREADS)
        self.command += ["--retry", "--worker-header", WORKER_HEADER, "--probe", harness.PROBE_PATH,
                         "--probe-answer", re.escape(expected) + r" \d+"]

    def phase(self, name: str) -> None:
        self.process.stdin.write(f"phase {name}\n")
        self.process.stdin.flush()


@dataclass
class Generations:
    """The masters and workers of an upgrade, as they appear."""

    old_master: int | None = None
    old_workers: frozenset[int] = frozenset()
    new_master: int | None = None
    new_workers: frozenset[int] = frozenset()


def _master_pid(prefix: Path, name: str = "nginx.pid") -> int | None:
    try:
        return int((prefix / "logs" / name).read_text())
    except (OSError, ValueError):
        return None


def _start_daemon(nginx: harness.Nginx, server: Path) -> int:
    """nginx as a daemon (a master whose parent exited: nginx ignores USR2 in a master whose
    parent is still the one that started it); the master's pid once it serves."""
    nginx.port = harness.free_port()
    conf = nginx.prefix / "nginx.conf"
    config = harness.CONFIG.format(workers=harness.WORKERS, port=nginx.port)
    config = config.replace("daemon off;", "daemon on;").replace(
        "root html;", f"root html;\n        add_header {WORKER_HEADER} $pid;")
    assert WORKER_HEADER in config
    conf.write_text(config)
    subprocess.run([str(server), "-p", f"{nginx.prefix}/", "-c", str(conf)], check=True, timeout=60)
    assert until(lambda: _master_pid(nginx.prefix) is not None, timeout=60), nginx.log("error.log")
    master = _master_pid(nginx.prefix)
    assert until(lambda: len(harness.children_of(master)) == harness.WORKERS, timeout=60)
    nginx.workers = harness.children_of(master)
    return master


def _kill_tree(pid: int | None) -> None:
    if not pid:
        return
    for target in [pid, *harness.children_of(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start(nginx: harness.Nginx, server: Path, seen: Generations) -> None:
    seen.old_master = _start_daemon(nginx, server)
    seen.old_workers = frozenset(nginx.workers)


def _upgrade_under_load(nginx: harness.Nginx, expected: str, seen: Generations) -> dict:
    """Load the started nginx, upgrade its binary (USR2, WINCH, QUIT to the old master); the
    load client's final counts. Every worker answers the probe ``expected`` before and after."""
    harness.probe_every_worker(nginx, expected)
    with UpgradeLoad(nginx, expected) as load:
        load.phase("before")
        load.wait_for_more()
        load.phase("upgrade")
        os.kill(seen.old_master, signal.SIGUSR2)                    # a new master from the binary
        assert until(lambda: _master_pid(nginx.prefix) not in (None, seen.old_master), timeout=60), \
            nginx.log("error.log")[-2000:]
        seen.new_master = _master_pid(nginx.prefix)
        assert until(lambda: len(harness.children_of(seen.new_master)) == harness.WORKERS, timeout=60)
        seen.new_workers = frozenset(harness.children_of(seen.new_master))
        load.wait_for_more()                                        # both generations serve
        load.phase("drain")
        os.kill(seen.old_master, signal.SIGWINCH)                   # the old workers leave
        # (the new master is a child of the old one too)
        assert until(lambda: not seen.old_workers & harness.children_of(seen.old_master), timeout=60)
        os.kill(seen.old_master, signal.SIGQUIT)                    # then the old master
        assert until(lambda: harness._stat(seen.old_master) is None, timeout=60)
        load.phase("after")
        load.wait_for_more()
        nginx.workers = set(seen.new_workers)
        harness.probe_every_worker(nginx, expected)
    assert load.final is not None, f"the load client gave no final count (last: {load.status})"
    return load.final


def _check_every_request(final: dict, seen: Generations, error_log: str) -> None:
    """Not one failed request; retried only requests lost on connections of the old workers
    (which close them as they stop; a retry on a new worker's connection would hide a
    crash), at most one per client thread and old worker; the old workers answered before the upgrade, only the new ones after it; no
    worker crashed."""
    phases = final["phases"]
    assert final["failed"] == 0, f"{final['failed']} of {final['requests']} requests failed: {final['errors']}"
    assert final["requests"] == sum(counts["requests"] for counts in phases.values())
    assert all(phases[name]["ok"] > 0 for name in PHASES if name != "drain"), phases
    # Each client thread holds one connection; it can lose a request to each old worker's
    # stop at most once (its retry may land on the other old worker, not yet stopping).
    assert final["retried"] <= harness.CLIENT_THREADS * harness.WORKERS, final["retry_causes"]
    lost_on = {pid for counts in phases.values() for pid in counts["retried_on"]}
    assert lost_on <= {str(pid) for pid in seen.old_workers}, \
        f"requests lost on connections of {lost_on}, not of an old worker {sorted(seen.old_workers)}: " \
        f"{final['retry_causes']}"
    assert set(phases["before"]["answered_by"]) == {str(pid) for pid in seen.old_workers}, phases["before"]
    assert set(phases["after"]["answered_by"]) == {str(pid) for pid in seen.new_workers}, phases["after"]
    assert "exited on signal" not in error_log, error_log[-3000:]


def _report(name: str, final: dict, seconds: float) -> None:
    summary = {phase: {key: counts[key] for key in ("requests", "retried", "failed")}
               for phase, counts in final["phases"].items()}
    harness.NGINX.record(f"upgrade-{name}.json", json.dumps({"seconds": round(seconds, 1), "load": final}, indent=1))
    print(f"nginx upgrade {name}: {final['requests']} requests, {final['retried']} retried, {final['failed']} failed, "
          f"max latency {final['max_latency_s']} s; by phase {summary}; retried: {final['retry_causes']}")


def _jumps_at_fix(*pids: int) -> dict[int, bool]:
    """Per process, whether its code of the function the fix replaces starts with a jump
    (patched), read in its memory."""
    path = os.path.realpath(harness.SERVER)
    with open(path, "rb") as stream:
        elf = ObjectFile(path, stream)
        try:
            symbol = elf.lookup_local(harness.FIXED_FUNCTION)
        finally:
            elf.close()
    return {pid: harness.function_bytes(pid, path, symbol)[:1] == JMP for pid in pids}


def test_binary_upgrade_under_the_service_serves_the_fix(nginx_build, tmp_path):
    server, patchroot = nginx_build
    store = tmp_path / "store"
    store.mkdir(mode=0o755)
    for path in [*patchroot.glob("*.kpatch"), patchroot / "SHA256SUMS"]:
        shutil.copy(path, store / path.name)
    paths = type("Paths", (), {"greeter": server, "plug": server})      # the service's --path
    service = Service(store, tmp_path, paths)
    nginx = harness.Nginx(server)
    seen = Generations()
    started = time.monotonic()
    try:
        # Patched at its exec by the service: the old generation answers fixed too, so every
        # probe of the load, before, during and after the upgrade, must be the fixed answer.
        _start(nginx, server, seen)
        old_generation = [seen.old_master, *seen.old_workers]
        assert _jumps_at_fix(*old_generation) == dict.fromkeys(old_generation, True)
        final = _upgrade_under_load(nginx, harness.PROBE_FIXED, seen)
        _report("service", final, time.monotonic() - started)
        _check_every_request(final, seen, nginx.log("error.log"))
        execs = {r["pid"] for r in service.status()["recent"] if r["how"] == "exec" and r["outcome"] == "applied"}
        assert seen.new_master in execs, json.dumps(service.status())[:2000]
        new_generation = [seen.new_master, *seen.new_workers]
        assert _jumps_at_fix(*new_generation) == dict.fromkeys(new_generation, True)
    finally:
        _kill_tree(seen.new_master)
        _kill_tree(seen.old_master)
        nginx.remove()
        service.stop()


def test_binary_upgrade_without_the_service(nginx_build):
    """The control: the same binary and upgrade under the same load with no service, no
    patch (the old answer all along): the retries it needs are nginx's own."""
    server, _ = nginx_build
    nginx = harness.Nginx(server)
    seen = Generations()
    started = time.monotonic()
    try:
        _start(nginx, server, seen)
        final = _upgrade_under_load(nginx, harness.PROBE_BUGGY, seen)
        _report("plain", final, time.monotonic() - started)
        _check_every_request(final, seen, nginx.log("error.log"))
        new_generation = [seen.new_master, *seen.new_workers]
        assert _jumps_at_fix(*new_generation) == dict.fromkeys(new_generation, False)
    finally:
        _kill_tree(seen.new_master)
        _kill_tree(seen.old_master)
        nginx.remove()
