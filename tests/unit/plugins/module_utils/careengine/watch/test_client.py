"""The command line without a service: it runs locally, also when a dead service left its socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from plugins.module_utils.careengine.watch import client

ROOT = Path(__file__).resolve().parents[6]
CTL = str(ROOT / "bin" / "libcare-ctl")
CLIENT_MAIN = ROOT / "plugins" / "module_utils" / "careengine" / "watch" / "client_main.py"


def test_forward_declines_without_a_socket_and_for_other_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBCARE_SOCKET", str(tmp_path / "none.sock"))
    assert client.forward(["info", "-p", "1"]) is None
    assert client.forward(["watch", "--status"]) is None


def test_a_stale_socket_falls_back_to_the_local_command(tmp_path):
    path = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()                                   # the file stays, nobody listens
    run = subprocess.run([CTL, "info", "-p", str(os.getpid()), "-s", ""], capture_output=True, text=True,
                         env={**os.environ, "LIBCARE_SOCKET": str(path)}, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert f"pid={os.getpid()}" in run.stdout


def test_a_listening_socket_gets_the_request_and_its_answer_is_printed(tmp_path):
    from plugins.module_utils.careengine.watch import protocol

    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    child = subprocess.Popen([CTL, "info", "-p", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "LIBCARE_SOCKET": str(path)}, cwd=str(tmp_path))
    connection, _ = listener.accept()
    data = b""
    while chunk := connection.recv(4096):
        data += chunk
    assert protocol.decode_request(data) == (str(tmp_path), ["info", "-p", "1"])
    connection.sendall(protocol.encode_answer(7, "from the service\n", "a warning\n"))
    connection.close()
    out, err = child.communicate(timeout=60)
    assert (child.returncode, out, err) == (7, "from the service\n", "a warning\n")


def _imported(argv: list[str], env: dict) -> set[str]:
    """The modules ``python -X importtime argv`` imports (its own start-up's included)."""
    run = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, env=env,
                         timeout=60, check=False)
    return {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")} - {
        "imported package"}


def test_the_launchers_client_imports_only_the_socket_and_its_own_two_modules(tmp_path):
    """What the client costs beyond the interpreter's start: no os, struct or __future__."""
    from plugins.module_utils.careengine.watch import protocol

    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def answer_once() -> None:
        connection, _ = listener.accept()
        with connection:
            while connection.recv(4096):
                pass
            connection.sendall(protocol.encode_answer(0, "", ""))

    server = threading.Thread(target=answer_once, daemon=True)
    server.start()
    env = {**os.environ, "LIBCARE_SOCKET": str(path)}
    bare = _imported(["-I", "-S", "-c", "pass"], env)
    client_run = _imported(["-I", "-S", str(CLIENT_MAIN), "info", "-p", "1"], env)
    server.join(timeout=60)
    listener.close()
    assert client_run - bare == {"_socket", "protocol", "client"}
