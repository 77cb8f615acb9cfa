#!/usr/bin/env python3
"""HTTP load for the nginx live-patch tests, in a process of its own.

    load_client.py --port PORT --body FILE [--threads 4] [--path /index.html] [--reconnect 20]
                   [--probe PATH --probe-answer REGEX [--probe-every 4]] [--worker-header NAME]
                   [--retry]

Client threads send GET requests over keep-alive connections (a new connection every
``--reconnect`` requests, so that every worker of a reuseport listener gets some): ``--path``,
and with ``--probe`` every ``--probe-every``-th request that path instead. With
``--worker-header``, the answers name the worker that sent them in that header (nginx:
``add_header X-Worker $pid``): the requests are counted per worker, and so are the retried
ones, by the worker that held the connection they were lost on. Every request counts once,
as one of:

* ok: status 200 and the expected body: the bytes of ``--body``; for the probe, a body that
  ``--probe-answer`` matches in full;
* retried (also ok): with ``--retry``, the request failed before any byte of its answer on a
  connection that had already served a request, and succeeded when sent again, once, on a
  new connection. A server closes an idle keep-alive connection whenever it likes (nginx
  does at a graceful shutdown); a request that crossed that close was not processed, and a
  client may repeat an idempotent one (RFC 9110 section 9.2.2, RFC 9112 section 9.3.1);
* failed: anything else: refused, reset or closed on a new connection, a timeout, a
  status other than 200, a wrong body, a retry that failed, and without ``--retry`` also
  what would have been retried.

A line ``phase NAME`` on stdin starts a phase: the counts are also kept per phase, a
request in the phase in which it was first sent. EOF on stdin stops the threads. Every
0.1 s a JSON line ``{"requests", "ok", "retried", "failed", "max_latency_s", "phase"}``;
the last one has ``"final": true``, ``"phases"`` (name -> those counts, ``answered_by`` and
``retried_on``: worker -> requests) and the first errors and retry causes.

A process of its own so that the client threads never hold the GIL of the process that
runs the patch engine (whose stop-the-patient time would then include waiting for it).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HOST = "127.0.0.1"
TIMEOUT_S = 60.0
KEPT_MESSAGES = 20
UNKNOWN = "?"            # the worker of a connection whose answers did not say
# Errors of a connection the server closed or reset under a request: the request did not
# reach it (or was never read); a timeout is not one of them.
CLOSED_UNDER_US = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class NoAnswer(Exception):
    """The connection was closed or reset before any byte of the answer."""


class BadAnswer(Exception):
    """The answer was cut short or is not HTTP/1.x with a Content-Length."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]          # names in lower case
    body: bytes
    keep_alive: bool


class Connection:
    """One keep-alive HTTP/1.1 connection that knows whether any byte of an answer came."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=TIMEOUT_S)
        self.served = 0
        self.worker = UNKNOWN
        self.pending = b""

    def close(self) -> None:
        self.sock.close()

    def exchange(self, request: bytes) -> Answer:
        """Send ``request``, read its whole answer."""
        self.pending = b""
        try:
            self.sock.sendall(request)
            head = self._read_head()
        except CLOSED_UNDER_US as exc:
            if self.pending:
                raise BadAnswer(f"{type(exc).__name__} after {len(self.pending)} bytes") from exc
            raise NoAnswer(type(exc).__name__) from exc
        status, headers, keep_alive = parse_head(head)
        answer = Answer(status, headers, self._read_body(int(headers["content-length"])), keep_alive)
        self.served += 1
        return answer

    def _receive(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk and not self.pending:
            raise NoAnswer("closed")
        if not chunk:
            raise BadAnswer(f"closed after {len(self.pending)} bytes")
        return chunk

    def _read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.pending:
            self.pending += self._receive()
        head, self.pending = self.pending.split(b"\r\n\r\n", 1)
        return head

    def _read_body(self, length: int) -> bytes:
        try:
            while len(self.pending) < length:
                self.pending += self._receive()
        except CLOSED_UNDER_US as exc:
            raise BadAnswer(f"{type(exc).__name__} in the body") from exc
        body, self.pending = self.pending[:length], self.pending[length:]
        return body


def parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    """(status, headers, whether the connection stays open) of an answer's head."""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise BadAnswer(f"status line {status_line[:60]!r}")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in header_lines)}
    if not headers.get("content-length", "").isdigit():
        raise BadAnswer("no Content-Length")
    keep_alive = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return int(parts[1]), headers, keep_alive


@dataclass(frozen=True)
class Target:
    """A request and the check of its answer's body: None if right, else what is wrong."""

    request: bytes
    check: Callable[[bytes], str | None]


def static_target(path: str, expected: bytes) -> Target:
    def check(body: bytes) -> str | None:
        return None if body == expected else f"{path}: {len(body)} bytes, not the {len(expected)} expected"
    return Target(request_for(path), check)


def probe_target(path: str, answer: str) -> Target:
    pattern = re.compile(answer)

    def check(body: bytes) -> str | None:
        text = body.decode(errors="replace")
        return None if pattern.fullmatch(text) else f"{path}: answered {text[:80]!r}"
    return Target(request_for(path), check)


def request_for(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


@dataclass(frozen=True)
class Outcome:
    kind: str                       # "ok", "retried" or "failed"
    worker: str = UNKNOWN           # who answered
    lost_on: str = UNKNOWN          # retried: the worker of the connection it was lost on
    message: str = ""               # what failed, or why the request was sent again


@dataclass
class Counts:
    requests: int = 0
    ok: int = 0
    retried: int = 0
    failed: int = 0
    answered_by: dict[str, int] = field(default_factory=dict)
    retried_on: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        self.requests += 1
        self.failed += outcome.kind == "failed"
        self.ok += outcome.kind != "failed"
        if outcome.kind != "failed":
            self.answered_by[outcome.worker] = self.answered_by.get(outcome.worker, 0) + 1
        if outcome.kind == "retried":
            self.retried += 1
            self.retried_on[outcome.lost_on] = self.retried_on.get(outcome.lost_on, 0) + 1


class Load:
    def __init__(self, port: int, targets: list[Target], reconnect: int, retry: bool, worker_header: str) -> None:
        self.port, self.targets, self.reconnect, self.retry = port, targets, reconnect, retry
        self.worker_header = worker_header.lower()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.phase = "start"
        self.total = Counts()
        self.phases: dict[str, Counts] = {self.phase: Counts()}
        self.max_latency = 0.0
        self.errors: list[str] = []
        self.retry_causes: list[str] = []

    def start_phase(self, name: str) -> None:
        with self.lock:
            self.phase = name
            self.phases.setdefault(name, Counts())

    def run(self) -> None:
        conn: Connection | None = None
        sent = 0
        while not self.stop.is_set():
            target = self.targets[sent % len(self.targets)]
            phase, started = self.phase, time.monotonic()
            outcome, conn = self.send(conn, target)
            self.record(phase, outcome, time.monotonic() - started)
            sent += 1
            if conn is not None and sent % self.reconnect == 0:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def send(self, conn: Connection | None, target: Target) -> tuple[Outcome, Connection | None]:
        """One request, on ``conn`` or a new connection; the connection to go on with."""
        reused = conn is not None
        try:
            conn = conn or Connection(self.port)
            answer = conn.exchange(target.request)
        except NoAnswer as exc:
            conn.close()
            if reused and self.retry:
                return self.send_again(target, conn.worker, f"reused connection to worker {conn.worker}: {exc}")
            return Outcome("failed", message=f"{'reused' if reused else 'new'} connection: no answer, {exc}"), None
        except (BadAnswer, OSError) as exc:
            if conn is not None:
                conn.close()
            return Outcome("failed", message=f"{type(exc).__name__}: {exc}"), None
        conn.worker = answer.headers.get(self.worker_header, UNKNOWN)
        outcome = judge(target, answer, conn.worker)
        if not answer.keep_alive or outcome.kind == "failed":
            conn.close()
            conn = None
        return outcome, conn

    def send_again(self, target: Target, lost_on: str, cause: str) -> tuple[Outcome, Connection | None]:
        outcome, conn = self.send(None, target)
        if outcome.kind == "failed":
            return Outcome("failed", message=f"retry after {cause} failed: {outcome.message}"), conn
        return Outcome("retried", outcome.worker, lost_on, cause), conn

    def record(self, phase: str, outcome: Outcome, latency: float) -> None:
        with self.lock:
            self.total.add(outcome)
            self.phases[phase].add(outcome)
            self.max_latency = max(self.max_latency, latency)
            kept = {"failed": self.errors, "retried": self.retry_causes}.get(outcome.kind)
            if kept is not None and len(kept) < KEPT_MESSAGES:
                kept.append(f"{phase}: {outcome.message}")

    def status(self, final: bool = False) -> str:
        with self.lock:
            record = {"requests": self.total.requests, "ok": self.total.ok, "retried": self.total.retried,
                      "failed": self.total.failed, "max_latency_s": round(self.max_latency, 4), "phase": self.phase}
            if final:
                record.update(final=True, phases={name: vars(counts) for name, counts in self.phases.items()},
                              errors=list(self.errors), retry_causes=list(self.retry_causes))
            return json.dumps(record)


def judge(target: Target, answer: Answer, worker: str) -> Outcome:
    if answer.status != 200:
        return Outcome("failed", worker, message=f"status {answer.status} from worker {worker}")
    wrong = target.check(answer.body)
    return Outcome("failed", worker, message=f"{wrong} (worker {worker})") if wrong else Outcome("ok", worker)


def read_commands(load: Load) -> None:
    """Phase lines from stdin until EOF, then stop the load."""
    for line in sys.stdin:
        words = line.split()
        if len(words) == 2 and words[0] == "phase":
            load.start_phase(words[1])
    load.stop.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", required=True, help="file with the expected answer body")
    parser.add_argument("--path", default="/index.html")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--reconnect", type=int, default=20)
    parser.add_argument("--probe", help="a second path, whose answer --probe-answer matches")
    parser.add_argument("--probe-answer", default="", help="regular expression")
    parser.add_argument("--probe-every", type=int, default=4)
    parser.add_argument("--worker-header", default="", help="the answer header that names the worker")
    parser.add_argument("--retry", action="store_true",
                        help="send again, once, a request a reused connection lost before any answer byte")
    args = parser.parse_args()
    with open(args.body, "rb") as stream:
        targets = [static_target(args.path, stream.read())]
    if args.probe:
        targets = targets * (args.probe_every - 1) + [probe_target(args.probe, args.probe_answer)]
    load = Load(args.port, targets, args.reconnect, args.retry, args.worker_header)
    threads = [threading.Thread(target=load.run, daemon=True) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    threading.Thread(target=read_commands, args=(load,), daemon=True).start()
    while not load.stop.wait(0.1):
        print(load.status(), flush=True)
    for thread in threads:
        thread.join(timeout=120)
    print(load.status(final=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
