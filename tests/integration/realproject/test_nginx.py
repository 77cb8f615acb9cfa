"""A CVE fixed in a running nginx, master and workers, without a restart.

nginx 1.22.1 from Debian 12's source package with Debian's backport of the
CVE-2026-42945 fix ("Rewrite: fixed escaping and possible buffer overrun", one line in
``ngx_http_script_regex_end_code``) taken out (``tests/realproject/nginx/prepare.sh``);
``libcare-patch-make`` builds the fix as a live patch (``build_patch.sh``). The
original-stage server runs as a master (root) and two workers (nobody) while four
client threads fetch a static file; the patch goes in and out twice through the
Python API. See ``tests/realproject/nginx/README.md``.

Skipped only when the sources cannot be fetched (prepare.sh exit status 77).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from realproject_harness import ROOT, RealProject

from plugins.module_utils.careengine.apply import operations
from plugins.module_utils.careengine.apply.object_files import ObjectFile
from plugins.module_utils.careengine.patchfile import load_patch, summarize
from plugins.module_utils.careengine.process import mapped_objects, read_memory

NGINX = RealProject(
    package="nginx",
    scripts=ROOT / "tests" / "realproject" / "nginx",
    cache=Path(os.environ.get("LIBCARE_NGINX_CACHE", ROOT / ".cache" / "realproject-nginx")),
    lock_variable="LIBCARE_NGINX_LOCKED",
    output=ROOT / "tests" / "output" / "realproject-nginx",
)
SCRIPTS, CACHE = NGINX.scripts, NGINX.cache
WORK = CACHE / "work"
SERVER = WORK / "lpmake" / "usr" / "local" / "nginx" / "sbin" / "nginx"
PATCHROOT = WORK / "patchroot"

FIXED_FUNCTION = "ngx_http_script_regex_end_code"
WORKERS = 2
CLIENT_THREADS = 4
CYCLES = 2
PHASE_SECONDS = 2.0      # load before, between and after the patch operations
NOBODY_UID = 65534
# A request through the location below: its URI has a "+", so nginx escapes captures
# where it believes they go into arguments. Pre-fix, the rewrite's "?c=1" leaves that
# belief set for the "set" after it: $1 is escaped ("+" -> "%2B") into a buffer sized
# for the unescaped value, which cuts it short (and writes 2 bytes past the buffer).
PROBE_PATH = "/probe/a+b"
PROBE_BUGGY = "[/probe/a%2]"
PROBE_FIXED = "[/probe/a+b]"
# A static file of known content for the load.
BODY = b"".join(b"libcare nginx load line %04d\n" % i for i in range(160))

CONFIG = """\
daemon off;
master_process on;
worker_processes {workers};
user nobody nogroup;
pid logs/nginx.pid;
error_log logs/error.log notice;
events {{ worker_connections 512; }}
http {{
    log_format workers '$pid $status $request_uri';
    access_log logs/access.log workers;
    server {{
        # reuseport: a socket per worker, new connections spread over both.
        listen 127.0.0.1:{port} reuseport;
        root html;
        location / {{ }}
        location /probe/ {{
            rewrite ^(.*) /new?c=1;
            set $myvar $1;
            return 200 "[$myvar] $pid";
        }}
    }}
}}
"""


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def cache_lock():
    with NGINX.locked():
        yield


@pytest.fixture(scope="module")
def prepared(cache_lock) -> None:
    NGINX.prepare(timeout=900)


@pytest.fixture(scope="module")
def built(prepared) -> dict:
    run = NGINX.run(["bash", str(SCRIPTS / "build_patch.sh")], timeout=900)
    NGINX.record("build_patch.out", run.stdout)
    NGINX.record("build_patch.err", run.stderr)
    assert run.returncode == 0, f"build_patch.sh failed:\n{run.stdout[-2000:]}\n{run.stderr[-6000:]}"
    bench = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(bench) == 1 and bench[0]["bench"] == "build_overhead_nginx", run.stdout
    return bench[0]


def test_prepared_tree_is_the_pre_fix_version(prepared):
    """The prepared tree lacks the fix and the fix (one line) applies to it (-p1)."""
    pristine, fix = CACHE / "pristine", CACHE / "fix.patch"
    source = (pristine / "src" / "http" / "ngx_http_script.c").read_text()
    end_code = source[source.index(f"\n{FIXED_FUNCTION}("):]
    end_code = end_code[:end_code.index("\n}\n")]
    assert "e->is_args = 0;" not in end_code
    text = fix.read_text()
    assert re.findall(r"^\+(?!\+\+).*$", text, re.M) == ["+    e->is_args = 0;"], text
    check = subprocess.run(["patch", "-p1", "--dry-run", "--batch", "-s", "-i", str(fix)], cwd=pristine,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_build_patch_for_the_server(built):
    """libcare-patch-make builds the fix: a patch named by the server's build-id that
    replaces exactly the function the fix changes."""
    assert built["unit"] == "s" and built["value"] > 0 and built["baseline"] > 0
    assert built["functions"] == [FIXED_FUNCTION] and built["new_functions"] == []
    patch = PATCHROOT / f"{built['build_id']}.kpatch"
    summary = summarize(load_patch(str(patch)))
    assert summary.build_id == built["build_id"]
    assert [f.name for f in summary.functions] == [FIXED_FUNCTION]


# --- the live server ---------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str] | None:
    """(ppid, comm) of ``pid``, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            text = stream.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), comm


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat and stat[0] == pid:
                found.add(int(entry))
    return found


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Nginx:
    """The original-stage server under a fresh prefix, master plus workers."""

    def __init__(self, server: Path) -> None:
        self.server = server
        self.prefix = Path(tempfile.mkdtemp(prefix="libcare-nginx-"))
        # The workers run as nobody: they must reach html/.
        os.chmod(self.prefix, 0o755)
        (self.prefix / "logs").mkdir()
        (self.prefix / "html").mkdir(mode=0o755)
        (self.prefix / "html" / "index.html").write_bytes(BODY)
        os.chmod(self.prefix / "html" / "index.html", 0o644)
        self.master: subprocess.Popen | None = None
        self.port = 0
        self.workers: set[int] = set()

    def start(self, attempts: int = 3) -> None:
        for _ in range(attempts):
            self.port = free_port()
            conf = self.prefix / "nginx.conf"
            conf.write_text(CONFIG.format(workers=WORKERS, port=self.port))
            with open(self.prefix / "logs" / "stderr.log", "ab") as stderr:
                self.master = subprocess.Popen([str(self.server), "-p", f"{self.prefix}/", "-c", str(conf)],
                                               stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
            if self._wait_ready(timeout=60):
                return
            self.stop()        # most likely the port was taken meanwhile: try another one
        pytest.fail(f"nginx did not start: {self.log('stderr.log')[-2000:]}\n{self.log('error.log')[-2000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                return False
            workers = {pid for pid in children_of(self.master.pid) if (_stat(pid) or (0, ""))[1] == "nginx"}
            self.workers |= workers          # all of them are killed in stop(), whatever happens
            if len(workers) == WORKERS:
                try:
                    status, body = get(self.port, "/index.html", timeout=5)
                except (OSError, http.client.HTTPException):
                    status, body = 0, b""
                if status == 200 and body == BODY:
                    self.workers = workers
                    return True
            time.sleep(0.05)
        return False

    @property
    def pids(self) -> list[int]:
        return [self.master.pid, *sorted(self.workers)]

    def log(self, name: str) -> str:
        try:
            return (self.prefix / "logs" / name).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Fast shutdown (SIGTERM), then SIGKILL to whatever is left, workers included."""
        if self.master is None:
            return
        leftovers = set(self.workers) | children_of(self.master.pid)
        if self.master.poll() is None:
            self.master.send_signal(signal.SIGTERM)
            try:
                self.master.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.master.kill()
                self.master.wait(timeout=30)
        for pid in leftovers:
            stat = _stat(pid)
            if stat and stat[1] == "nginx":
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.master = None
        self.workers = set()

    def remove(self) -> None:
        shutil.rmtree(self.prefix, ignore_errors=True)


class Load:
    """``load_client.py`` in a process of its own: CLIENT_THREADS threads fetching the
    static file over keep-alive connections, each answer checked; its counters are read
    from the JSON lines it prints."""

    def __init__(self, nginx: Nginx, threads: int) -> None:
        self.command = [sys.executable, str(SCRIPTS / "load_client.py"), "--port", str(nginx.port),
                        "--body", str(nginx.prefix / "html" / "index.html"), "--threads", str(threads)]
        self.process: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None
        self.status: dict = {"ok": 0, "failed": 0}
        self.final: dict | None = None

    @property
    def ok(self) -> int:
        return self.status["ok"]

    def __enter__(self) -> Load:
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.status = record
            if record.get("final"):
                self.final = record

    def __exit__(self, *exc) -> None:
        """Stop the clients (EOF on their stdin) and collect the final counts."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=30)

    def wait_for_more(self, count: int = 200, seconds: float = PHASE_SECONDS, timeout: float = 120) -> None:
        """Let the load run for ``seconds`` and at least ``count`` more answers."""
        target, until = self.ok + count, time.monotonic() + seconds

        def progressed() -> bool:
            assert self.process.poll() is None, f"the load client exited: {self.status}"
            return self.ok >= target and time.monotonic() >= until

        wait_until(progressed, timeout, f"{count} more load requests ({self.status})")


def probe_every_worker(nginx: Nginx, expected: str, timeout: float = 120) -> dict[int, int]:
    """Probe until every worker answered; every answer must be ``expected``."""
    answered: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while set(answered) != nginx.workers:
        assert time.monotonic() < deadline, f"probes reached only workers {sorted(answered)} of {nginx.workers}"
        status, body = get(nginx.port, PROBE_PATH)
        text = body.decode(errors="replace")
        match = re.fullmatch(r"(\[.*\]) (\d+)", text)
        assert status == 200 and match, f"probe answer {status} {text!r}"
        assert match.group(2) and int(match.group(2)) in nginx.workers, text
        assert match.group(1) == expected, f"worker {match.group(2)} answered {match.group(1)!r}, not {expected!r}"
        answered[int(match.group(2))] = answered.get(int(match.group(2)), 0) + 1
    return answered


def function_bytes(pid: int, path: str, symbol) -> bytes:
    """The patient's bytes of one function (``symbol``: its SymbolDef) of the object ``path``."""
    mapped = next(o for o in mapped_objects(pid) if o.path == path)
    return read_memory(pid, mapped.load_bias + symbol.vaddr, symbol.size)


@pytest.fixture
def nginx(built):
    server = Nginx(SERVER)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        NGINX.record("error.log", server.log("error.log"))
        server.remove()


def test_fix_applied_live_to_master_and_workers_under_load(built, nginx):
    """Two patch/unpatch cycles of master and workers under load: every process patched
    and restored byte for byte, the fixed answer only while patched, no failed request,
    no process lost."""
    path = os.path.realpath(SERVER)
    with open(path, "rb") as stream:
        elf = ObjectFile(path, stream)
        try:
            symbol = elf.lookup_local(FIXED_FUNCTION)
        finally:
            elf.close()
    assert symbol is not None and symbol.size >= 5
    pids = nginx.pids
    assert all(uid_of(pid) == NOBODY_UID for pid in nginx.workers)
    assert uid_of(nginx.master.pid) == 0
    originals = {pid: function_bytes(pid, path, symbol) for pid in pids}
    assert all(code[:1] != b"\xe9" for code in originals.values())
    timeline: list[dict] = []
    started = time.monotonic()

    with Load(nginx, CLIENT_THREADS) as load:
        load.wait_for_more()
        probes = probe_every_worker(nginx, PROBE_BUGGY)
        timeline.append({"step": "before", "probes": probes, "ok": load.ok})
        for cycle in range(CYCLES):
            results = {r.pid: r for r in operations.patch_processes(str(PATCHROOT), pids, timeout=30.0)}
            assert sorted(results) == sorted(pids)
            for pid, result in results.items():
                assert not result.error, f"patch {pid}: {result.error}"
                assert [(o.path, o.action, o.functions) for o in result.objects] == [
                    (path, "applied", (FIXED_FUNCTION,))], f"patch {pid}: {result.objects}"
                assert function_bytes(pid, path, symbol)[:1] == b"\xe9", f"{pid}: no jump at {FIXED_FUNCTION}"
            timeline.append({"step": f"patch {cycle}", "ok": load.ok,
                             "paused_us": {pid: r.paused_us for pid, r in results.items()}})

            infos = {i.pid: i for i in operations.info_processes(pids, str(PATCHROOT))}
            for pid in pids:
                objects = [o for o in infos[pid].objects if o.build_id == built["build_id"]]
                assert [(o.applied_level, o.available_level, o.functions) for o in objects] == [
                    (0, 0, (FIXED_FUNCTION,))], f"info {pid}: {infos[pid]}"

            load.wait_for_more()
            probes = probe_every_worker(nginx, PROBE_FIXED)
            timeline.append({"step": f"patched {cycle}", "probes": probes, "ok": load.ok})

            results = {r.pid: r for r in operations.unpatch_processes(pids, timeout=30.0)}
            assert sorted(results) == sorted(pids)
            for pid, result in results.items():
                assert not result.error, f"unpatch {pid}: {result.error}"
                assert [(o.path, o.action) for o in result.objects] == [(path, "removed")], \
                    f"unpatch {pid}: {result.objects}"
                assert function_bytes(pid, path, symbol) == originals[pid], f"{pid}: {FIXED_FUNCTION} not restored"
            timeline.append({"step": f"unpatch {cycle}", "ok": load.ok,
                             "paused_us": {pid: r.paused_us for pid, r in results.items()}})

            load.wait_for_more()
            probes = probe_every_worker(nginx, PROBE_BUGGY)
            timeline.append({"step": f"unpatched {cycle}", "probes": probes, "ok": load.ok})

    served = {}
    for line in nginx.log("access.log").splitlines():
        pid, status, uri = line.split(" ", 2)
        if uri == "/index.html":
            served[int(pid)] = served.get(int(pid), 0) + 1
    final = load.final
    report = {"seconds": round(time.monotonic() - started, 2), "load": final, "served_by": served,
              "timeline": timeline}
    NGINX.record("live.json", json.dumps(report, indent=1, default=str))

    assert final is not None, f"the load client gave no final count (last: {load.status})"
    assert final["failed"] == 0, f"{final['failed']} failed requests: {final['errors']}"
    assert final["ok"] >= 1000
    assert set(served) == nginx.workers, f"load served by {served}, workers {nginx.workers}"
    assert nginx.master.poll() is None, "the master exited"
    assert children_of(nginx.master.pid) == nginx.workers, "a worker was lost or replaced"
    assert all(_stat(pid) for pid in pids)
    assert "exited on signal" not in nginx.log("error.log"), nginx.log("error.log")[-3000:]
