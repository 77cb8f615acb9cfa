#!/usr/bin/env python3
"""HTTP load for the nginx live-patch test, in a process of its own.

    load_client.py --port PORT --body FILE [--threads 4] [--path /index.html] [--reconnect 20]

Client threads GET ``--path`` over keep-alive connections (a new connection every
``--reconnect`` requests, so that both workers of a reuseport listener get some) and
check every answer: status 200 and exactly the bytes of ``--body``. Prints a JSON line
``{"ok": n, "failed": n, "max_latency_s": s}`` every 0.1 s; when its stdin reaches EOF
it stops the threads and prints a last line with ``"final": true`` and the first errors.

A process of its own so that the client threads never hold the GIL of the process that
runs the patch engine (whose stop-the-patient time would then include waiting for it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time


class Load:
    def __init__(self, port: int, path: str, body: bytes, reconnect: int) -> None:
        self.port, self.path, self.body, self.reconnect = port, path, body, reconnect
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.max_latency = 0.0
        self.errors: list[str] = []

    def fail(self, message: str) -> None:
        with self.lock:
            self.failed += 1
            if len(self.errors) < 20:
                self.errors.append(message)

    def run(self) -> None:
        conn = None
        sent = 0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or body != self.body:
                    self.fail(f"status {response.status}, {len(body)} bytes")
                else:
                    with self.lock:
                        self.ok += 1
                        self.max_latency = max(self.max_latency, time.monotonic() - started)
                sent += 1
                if sent % self.reconnect == 0 or response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                self.fail(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def status(self, final: bool = False) -> str:
        with self.lock:
            record = {"ok": self.ok, "failed": self.failed, "max_latency_s": round(self.max_latency, 4)}
            if final:
                record.update(final=True, errors=list(self.errors))
        return json.dumps(record)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", required=True, help="file with the expected answer body")
    parser.add_argument("--path", default="/index.html")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--reconnect", type=int, default=20)
    args = parser.parse_args()
    with open(args.body, "rb") as stream:
        body = stream.read()
    load = Load(args.port, args.path, body, args.reconnect)
    threads = [threading.Thread(target=load.run, daemon=True) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    watcher = threading.Thread(target=lambda: (sys.stdin.read(), load.stop.set()), daemon=True)
    watcher.start()
    while not load.stop.wait(0.1):
        print(load.status(), flush=True)
    for thread in threads:
        thread.join(timeout=120)
    print(load.status(final=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
