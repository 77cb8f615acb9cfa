#!/usr/bin/env python3
"""Apply the real project's fix live to a redis-server under client load.

    tests/realproject/live_patch.py [--cache DIR] [--clients N] [--seconds S] [--cycles N]

Needs the outputs of ``build_patch.sh`` in ``$CACHE/work``: the pre-fix server
``lpmake/bin/redis-server`` and its patch ``patchroot/<build-id>.kpatch``.

1. start the pre-fix server on 127.0.0.1 (a free port; no persistence);
2. the bug (CVE-2025-67733): ``FUNCTION LIST "X\\r\\n+INJECTED"`` followed by ``PING``
   on one connection. Pre-fix, the error reply carries the client's CR/LF verbatim,
   so the server sends THREE replies for two commands::

       -ERR Unknown argument X\\r\\n+INJECTED\\r\\n+PONG\\r\\n

   (a client reads ``+INJECTED`` as the answer to its ``PING``: the stream is out of
   step). Fixed, CR and LF are replaced by spaces: two replies::

       -ERR Unknown argument X  +INJECTED\\r\\n+PONG\\r\\n
3. a bounded client load (N connections, each SET/GET/INCR with checked answers,
   at most --requests requests and --seconds seconds each), one connection that
   keeps sending the probe of 2 and classifies every answer as old/new, and a
   saturating pipelined ``redis-benchmark`` (bounded by --benchmark-requests) so the
   event loop is usually inside replaced functions when it is stopped;
4. during the load, --cycles times: ``libcare-ctl patch -p PID --json patchroot/``, then
   the probe must answer the fixed way (``libcare-ctl info`` must show the patch);
   ``libcare-ctl unpatch -p PID --json``, then the probe must answer the old way again;
5. zero failed client requests (error replies, wrong values, timeouts, lost
   connections), the INCR counter equal to the INCRs acknowledged, every probe answer
   exactly one of the two forms, and never the new form outside the patched window.

Prints JSON lines (the steps' results, the bench figures) and exits 0 when every check
holds, 1 otherwise. Everything started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CTL = os.path.join(ROOT, "bin", "libcare-ctl")

OLD_ANSWER = b"-ERR Unknown argument X\r\n+INJECTED\r\n+PONG\r\n"
NEW_ANSWER = b"-ERR Unknown argument X  +INJECTED\r\n+PONG\r\n"


T0 = time.monotonic()   # times in the output are relative to the start


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def note(message: str) -> None:
    print(f"realproject: {message}", file=sys.stderr, flush=True)


def command(*args: bytes | str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Connection:
    """A minimal RESP2 client over one TCP connection."""

    # 20 s: generous on a loaded 2-core host; a server left stopped still fails the run.
    def __init__(self, port: int, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> object:
        """One reply: bytes (status/bulk), int, None, list, or an Exception for errors."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RuntimeError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self.buffer) < size + 2:
                self._fill()
            data, self.buffer = self.buffer[:size], self.buffer[size + 2:]
            return data
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise ValueError(f"bad reply line {line!r}")

    def call(self, *args: bytes | str) -> object:
        self.sock.sendall(command(*args))
        return self.reply()

    def raw(self, request: bytes, until: bytes) -> bytes:
        """Send raw bytes and read until the received data ends with ``until``."""
        self.sock.sendall(request)
        while not self.buffer.endswith(until):
            self._fill()
        data, self.buffer = self.buffer, b""
        return data


PROBE = command("FUNCTION", "LIST", "X\r\n+INJECTED") + command("PING")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LoadStats:
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    incr_acked: int = 0
    max_latency: float = 0.0
    max_latency_at: float = 0.0      # when the slowest request was sent


@dataclass
class ProbeStats:
    # (sent, received, old|new|other): a request sent after the patch returned must be
    # answered the new way; an answer received before the patch started, the old way.
    answers: list[tuple[float, float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class _ClientTally:
    """One load client's counts, added to the shared LoadStats when it ends."""

    done: int = 0
    failed: int = 0
    incr: int = 0
    worst: float = 0.0
    worst_at: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add_to(self, stats: LoadStats) -> None:
        stats.requests += self.done
        stats.incr_acked += self.incr
        if self.worst > stats.max_latency:
            stats.max_latency, stats.max_latency_at = self.worst, self.worst_at
        stats.failures.extend(self.errors)


def _one_round(conn: Connection, index: int, n: int, tally: _ClientTally) -> None:
    """SET, GET and INCR once, each answer checked; a lost connection is raised."""
    key, value = f"key:{index}:{n % 64}", f"value-{index}-{n}"
    for request, check in (
        (("SET", key, value), lambda r: r == b"OK"),
        (("GET", key), lambda r, v=value: r == v.encode()),
        (("INCR", "counter"), lambda r: isinstance(r, int)),
    ):
        start = time.monotonic()
        try:
            answer = conn.call(*request)
        except (OSError, ValueError, ConnectionError) as exc:
            tally.errors.append(f"client {index}: {request[0]} sent at {start - T0:.3f}s: {exc!r}")
            tally.failed += 1
            raise
        if time.monotonic() - start > tally.worst:
            tally.worst, tally.worst_at = time.monotonic() - start, start
        tally.done += 1
        if not check(answer):
            tally.failed += 1
            if len(tally.errors) < 5:
                tally.errors.append(f"client {index}: {request[0]} answered {answer!r}")
        elif request[0] == "INCR":
            tally.incr += 1


def load_client(port: int, index: int, stop: threading.Event, max_requests: int, deadline: float,
                stats: LoadStats, lock: threading.Lock) -> None:
    try:
        conn = Connection(port)
    except OSError as exc:
        with lock:
            stats.failures.append(f"client {index}: connect: {exc}")
        return
    tally = _ClientTally()
    try:
        n = 0
        while not stop.is_set() and tally.done < max_requests and time.monotonic() < deadline:
            _one_round(conn, index, n, tally)
            n += 1
    except (OSError, ValueError, ConnectionError):
        pass
    finally:
        conn.close()
        with lock:
            tally.add_to(stats)


def probe_client(port: int, stop: threading.Event, deadline: float, stats: ProbeStats) -> None:
    try:
        conn = Connection(port)
    except OSError as exc:
        stats.failures.append(f"probe: connect: {exc}")
        return
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            answer = conn.raw(PROBE, b"+PONG\r\n")
            kind = "old" if answer == OLD_ANSWER else "new" if answer == NEW_ANSWER else "other"
            if kind == "other":
                stats.failures.append(f"probe: unexpected answer {answer!r}")
            stats.answers.append((sent, time.monotonic(), kind))
            time.sleep(0.002)
    except (OSError, ConnectionError) as exc:
        stats.failures.append(f"probe: {exc!r}")
    finally:
        conn.close()


# More of the fix, checked with the patient idle (never during a patch operation):
# (name, request, pre-fix answer, fixed answer). The Lua error paths go through
# luaCallFunction (script_lua.o) into addReplyErrorSdsExSafe, a function the patch
# adds (networking.o); status_reply goes through addReplyStatusSafe (also new) and
# answered the same before.
SCRIPT_ERROR = "error('X\\r\\n+INJECTED')"
SCRIPT_ERROR_REPLY = "return error(redis.error_reply('X\\r\\n+INJECTED'))"
SCRIPT_STATUS = "return redis.status_reply('X\\r\\n+INJECTED')"
EXTRA_PROBES: tuple[tuple[str, bytes, bytes, bytes], ...] = (
    ("eval error()", command("EVAL", SCRIPT_ERROR, "0"),
     b"-ERR user_script:1: X\r\n+INJECTED script: %s, on @user_script:1.\r\n",
     b"-ERR user_script:1: X  +INJECTED script: %s, on @user_script:1.\r\n"),
    ("eval error(redis.error_reply())", command("EVAL", SCRIPT_ERROR_REPLY, "0"),
     b"-ERR X\r\n+INJECTED script: %s, on @user_script:1.\r\n",
     b"-ERR X  +INJECTED script: %s, on @user_script:1.\r\n"),
    ("eval redis.status_reply()", command("EVAL", SCRIPT_STATUS, "0"),
     b"+X  +INJECTED\r\n", b"+X  +INJECTED\r\n"),
)
SCRIPTS = {"eval error()": SCRIPT_ERROR, "eval error(redis.error_reply())": SCRIPT_ERROR_REPLY}


def probe_once(port: int) -> str:
    """'old' or 'new' when every probe answers that way; else what differed."""
    conn = Connection(port)
    kinds: dict[str, str] = {}
    try:
        answer = conn.raw(PROBE, b"+PONG\r\n")
        kinds["function list"] = ("old" if answer == OLD_ANSWER else "new" if answer == NEW_ANSWER
                                  else f"other {answer!r}")
        for name, request, old, new in EXTRA_PROBES:
            if name in SCRIPTS:
                sha = hashlib.sha1(SCRIPTS[name].encode()).hexdigest().encode()
                old, new = old % sha, new % sha
            answer = conn.raw(request + command("PING"), b"+PONG\r\n")[: -len(b"+PONG\r\n")]
            if answer == old == new:
                continue
            kinds[name] = "old" if answer == old else "new" if answer == new else f"other {answer!r}"
    finally:
        conn.close()
    found = set(kinds.values())
    return found.pop() if len(found) == 1 else json.dumps(kinds)


def ctl(*args: str, timeout: float = 120) -> tuple[int, dict | None, str, float]:
    start = time.monotonic()
    run = subprocess.run([CTL, *args], capture_output=True, text=True, timeout=timeout, check=False)
    elapsed = time.monotonic() - start
    try:
        data = json.loads(run.stdout) if run.stdout.strip() else None
    except json.JSONDecodeError:
        data = None
    return run.returncode, data, (run.stdout + run.stderr).strip(), elapsed


def patch_functions(patchroot: str) -> set[str]:
    """Names of the functions the patches in ``patchroot`` replace (libcare-dump --json)."""
    names: set[str] = set()
    for name in sorted(os.listdir(patchroot)):
        if name.endswith(".kpatch"):
            run = subprocess.run([os.path.join(ROOT, "bin", "libcare-dump"), "--json", os.path.join(patchroot, name)],
                                 capture_output=True, text=True, check=True)
            names.update(f["name"] for f in json.loads(run.stdout).get("functions", []))
    return names


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"redis-server exited with {server.returncode}")
        try:
            conn = Connection(port, timeout=1)
            try:
                if conn.call("PING") == b"PONG":
                    return
            finally:
                conn.close()
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not answer PING")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=os.environ.get("LIBCARE_REALPROJECT_CACHE",
                                                          os.path.join(ROOT, ".cache", "realproject")))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300000, help="at most this many per client")
    parser.add_argument("--seconds", type=float, default=40, help="the load stops after this long at most")
    parser.add_argument("--cycles", type=int, default=3, help="patch/unpatch cycles under load")
    parser.add_argument("--hold", type=float, default=1.0, help="seconds patched in each cycle")
    parser.add_argument("--io-threads", type=int, default=0,
                        help="run redis with this many I/O threads (reads too); see refusal_expected")
    parser.add_argument("--benchmark-requests", type=int, default=1000000,
                        help="redis-benchmark requests alongside (0: none)")
    return parser.parse_args(argv)


class Checks:
    """The run's checks, each noted as it is made."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok, detail))
        if ok and (len(detail) > 200 or "\n" in detail):
            detail = ""
        note(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
        return ok

    @property
    def failed(self) -> list[str]:
        return [name for name, ok, _ in self.results if not ok]


def start_server(server_path: str, port: int, rundir: str, io_threads: int) -> subprocess.Popen:
    return subprocess.Popen(
        [server_path, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--dir", rundir, "--logfile", os.path.join(rundir, "redis.log"),
         *(["--io-threads", str(io_threads), "--io-threads-do-reads", "yes"] if io_threads else [])],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class Load:
    """The client threads, the probe thread and redis-benchmark running against the server."""

    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    stats: LoadStats = field(default_factory=LoadStats)
    probe: ProbeStats = field(default_factory=ProbeStats)
    benchmark: subprocess.Popen | None = None

    def start(self, port: int, args: argparse.Namespace, server_path: str) -> None:
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds
        for index in range(args.clients):
            self.threads.append(threading.Thread(target=load_client, daemon=True,
                                                 args=(port, index, self.stop, args.requests, deadline,
                                                       self.stats, lock)))
        self.threads.append(threading.Thread(target=probe_client, daemon=True,
                                             args=(port, self.stop, deadline, self.probe)))
        for thread in self.threads:
            thread.start()
        if args.benchmark_requests:
            # Saturate the event loop (pipelined, 50 connections) so that it is usually
            # inside the replaced functions (processInputBuffer...) when stopped.
            self.benchmark = subprocess.Popen(
                [os.path.join(os.path.dirname(server_path), "redis-benchmark"), "-h", "127.0.0.1",
                 "-p", str(port), "-c", "50", "-P", "16", "-n", str(args.benchmark_requests),
                 "-t", "set,get,incr,lpush,lpop", "-r", "100000", "--csv"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop_threads(self, timeout: float) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=timeout)


def _objects(result: dict | None) -> list[dict]:
    return [o for p in (result or {}).get("processes", []) for o in p.get("objects", [])]


def _pauses(result: dict | None) -> list[int]:
    return [p["paused_us"] for p in (result or {}).get("processes", []) if p.get("paused_us")]


def _done(status: int, result: dict | None, action: str) -> bool:
    """libcare-ctl succeeded, nothing failed and at least one object got ``action``."""
    return (status == 0 and result is not None and result.get("summary", {}).get("failed", 0) == 0
            and any(o.get("action") == action for o in _objects(result)))


def expect_refusal(pid: int, port: int, patchroot: str, replaced: set[str], check: Checks) -> None:
    """Redis' I/O threads never leave IOThreadMain (they spin or wait on a mutex in it), and
    with reads threaded the main thread spins in handleClientsWithPendingReadsUsingThreads
    while they work: a patch that replaces these can never be applied safely. The engine
    must give up cleanly, naming a thread and the replaced function it is executing."""
    status, result, output, elapsed = ctl("patch", "-p", str(pid), "--json", patchroot)
    emit({"step": "patch", "cycle": 0, "status": status, "seconds": round(elapsed, 3), "result": result})
    reasons = [o.get("reason", "") for o in _objects(result) if o.get("action") == "failed"] + \
        [p.get("error", "") for p in (result or {}).get("processes", [])]
    named = [n for r in reasons if re.search(r"thread \d+", r)
             for n in re.findall(r"[A-Za-z_][\w.]*", r) if n in replaced]
    check("patch refused, naming a thread inside a replaced function",
          status != 0 and bool(named), "; ".join(reasons)[:500])
    check("old behaviour kept after the refusal", probe_once(port) == "old")
    time.sleep(1.0)


def patch_cycle(cycle: int, pid: int, port: int, patchroot: str, hold: float, check: Checks,
                pauses: list[int]) -> tuple[float, float, float, float]:
    """Patch under load, probe, (info), hold, unpatch, probe; the patched window's times."""
    patched_at = time.monotonic()
    status, result, output, elapsed = ctl("patch", "-p", str(pid), "--json", patchroot)
    patch_done = time.monotonic()
    emit({"step": "patch", "cycle": cycle, "status": status, "seconds": round(elapsed, 3),
          "at": round(patched_at - T0, 3), "result": result})
    ok = check(f"cycle {cycle}: libcare-ctl patch applied the patch to redis-server",
               _done(status, result, "applied"), output[-2000:])
    pauses += _pauses(result)
    after = probe_once(port)
    check(f"cycle {cycle}: fixed behaviour after the patch", ok and after == "new", after)
    if cycle == 1:
        status, info, output, _ = ctl("info", "-p", str(pid), "--json")
        emit({"step": "info", "status": status, "result": info})
        shown = [o for o in _objects(info) if o.get("path", "").endswith("/redis-server")]
        check("libcare-ctl info shows the applied patch", status == 0 and bool(shown)
              and shown[0].get("applied_level") is not None, output[-1000:])

    time.sleep(hold)
    unpatch_at = time.monotonic()
    status, result, output, elapsed = ctl("unpatch", "-p", str(pid), "--json")
    unpatch_done = time.monotonic()
    emit({"step": "unpatch", "cycle": cycle, "status": status, "seconds": round(elapsed, 3),
          "at": round(unpatch_at - T0, 3), "result": result})
    check(f"cycle {cycle}: libcare-ctl unpatch removed it", _done(status, result, "removed"), output[-2000:])
    pauses += _pauses(result)
    restored = probe_once(port)
    check(f"cycle {cycle}: old behaviour back after unpatch", restored == "old", restored)
    time.sleep(hold / 2)
    return patched_at, patch_done, unpatch_at, unpatch_done


def check_load(load: Load, port: int, windows: list[tuple[float, float, float, float]],
               refusal_expected: bool, check: Checks) -> None:
    """What the clients and the probe saw over the whole run."""
    check("load threads finished", not any(t.is_alive() for t in load.threads))
    check("client requests during the patch", load.stats.requests > 0, f"{load.stats.requests} requests")
    check("zero failed client requests", not load.stats.failures, "; ".join(load.stats.failures[:5]))
    counter = Connection(port).call("GET", "counter")
    check("INCR counter equals the INCRs acknowledged",
          counter == str(load.stats.incr_acked).encode(), f"{counter!r} vs {load.stats.incr_acked}")
    check("probe answers all well-formed", not load.probe.failures, "; ".join(load.probe.failures[:3]))
    misplaced = [
        kind for sent, received, kind in load.probe.answers
        if (kind == "new" and not any(received >= w[0] and sent <= w[3] for w in windows))
        or (kind == "old" and any(sent > w[1] and received < w[2] for w in windows))]
    kinds = {k: sum(1 for _, _, x in load.probe.answers if x == k) for k in ("old", "new")}
    check("probe: new answers only while patched, old ones only outside", not misplaced,
          f"{kinds}, misplaced {len(misplaced)}")
    if not refusal_expected:
        check("probe saw both behaviours under load", kinds["old"] > 0 and kinds["new"] > 0, str(kinds))


def finish_benchmark(benchmark: subprocess.Popen, check: Checks) -> None:
    """Bounded by its request count; what is left once the checks are done is cut short."""
    stopped_early = benchmark.poll() is None
    if stopped_early:
        benchmark.terminate()
    try:
        bench_out, _ = benchmark.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        benchmark.kill()
        bench_out, _ = benchmark.communicate()
    bench_errors = [line for line in bench_out.splitlines() if "error" in line.lower()]
    check("redis-benchmark (saturating, pipelined) without errors",
          (benchmark.returncode == 0 or stopped_early) and not bench_errors,
          f"exit {benchmark.returncode}; {bench_errors[:3]}")
    emit({"step": "redis-benchmark", "csv": bench_out.strip().splitlines()})


def emit_figures(pauses: list[int], load: Load, args: argparse.Namespace, refusal_expected: bool) -> None:
    if pauses:
        emit({"bench": "realproject_patch_pause", "value": max(pauses), "unit": "us", "all_us": pauses})
    emit({"bench": "realproject_load", "value": load.stats.requests, "unit": "requests",
          "failed": len(load.stats.failures), "max_latency_ms": round(load.stats.max_latency * 1000, 1),
          "max_latency_at": round(load.stats.max_latency_at - T0, 3), "end_at": round(time.monotonic() - T0, 3),
          "clients": args.clients, "cycles": 0 if refusal_expected else args.cycles,
          "io_threads": args.io_threads})


def clean_up(load: Load, server: subprocess.Popen, rundir: str, check: Checks) -> None:
    """Stop everything started here; show the server's log when a check failed."""
    load.stop_threads(timeout=10)
    if load.benchmark is not None and load.benchmark.poll() is None:
        load.benchmark.kill()
        load.benchmark.wait()
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    log = os.path.join(rundir, "redis.log")
    if os.path.exists(log) and check.failed:
        with open(log, encoding="utf-8", errors="replace") as stream:
            note("redis log tail:\n" + "".join(stream.readlines()[-20:]))
    subprocess.run(["rm", "-rf", rundir], check=False)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cache_lock = None
    if not os.environ.get("LIBCARE_REALPROJECT_LOCKED"):
        # The same lock as common.sh's lock_cache: no build may replace work/ meanwhile.
        os.makedirs(args.cache, exist_ok=True)
        cache_lock = open(os.path.join(args.cache, ".lock"), "w")  # noqa: SIM115 - held until exit
        fcntl.flock(cache_lock, fcntl.LOCK_EX)
    work = os.path.join(args.cache, "work")
    server_path = os.path.join(work, "lpmake", "bin", "redis-server")
    patchroot = os.path.join(work, "patchroot")
    if not os.access(server_path, os.X_OK) or not os.path.isdir(patchroot):
        note(f"no {server_path} or {patchroot}: run tests/realproject/build_patch.sh first")
        return 1

    check = Checks()
    replaced = patch_functions(patchroot)
    refusal_expected = bool(args.io_threads) and "IOThreadMain" in replaced
    if args.io_threads:
        note(f"--io-threads {args.io_threads}: the patch {'replaces' if refusal_expected else 'leaves'} "
             "IOThreadMain: expecting " + ("a clean refusal" if refusal_expected else "success"))

    port = free_port()
    rundir = tempfile.mkdtemp(prefix="realproject-redis-")
    server = start_server(server_path, port, rundir, args.io_threads)
    load = Load()
    try:
        wait_ready(port, server)
        pid = server.pid
        note(f"redis-server pid {pid} on 127.0.0.1:{port}")
        before = probe_once(port)
        check("bug present before the patch", before == "old", before)
        load.start(port, args, server_path)
        time.sleep(1.0)

        windows: list[tuple[float, float, float, float]] = []
        pauses: list[int] = []
        if refusal_expected:
            expect_refusal(pid, port, patchroot, replaced, check)
        for cycle in range(1, 0 if refusal_expected else args.cycles + 1):
            windows.append(patch_cycle(cycle, pid, port, patchroot, args.hold, check, pauses))

        load.stop_threads(timeout=30)
        check_load(load, port, windows, refusal_expected, check)
        if load.benchmark is not None:
            finish_benchmark(load.benchmark, check)
        check("redis-server still running", server.poll() is None)
        emit_figures(pauses, load, args, refusal_expected)
    except Exception as exc:  # noqa: BLE001 - reported as a failed check, then cleaned up
        check("harness", False, f"{type(exc).__name__}: {exc}")
    finally:
        clean_up(load, server, rundir, check)
    failed = check.failed
    emit({"step": "result", "ok": not failed, "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
