"""The apply_patch role's libcare-ctl launcher (templates/libcare-ctl.j2), rendered for
this checkout and run as the kernel runs it (its shebang): a command the service takes
goes through the socket when one listens; anything else, LIBCARE_NO_SERVICE, or a path
that is not a socket runs the engine's full command line; Python's environment variables
are ignored (-I)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import jinja2
import pytest

from plugins.module_utils.careengine.watch import protocol

ROOT = Path(__file__).resolve().parents[4]
TEMPLATE = ROOT / "roles" / "apply_patch" / "templates" / "libcare-ctl.j2"
PYTHON = ROOT / ".venv" / "bin" / "python"


@pytest.fixture
def launcher(tmp_path) -> Path:
    """The template rendered with this checkout as the engine directory, executable."""
    text = jinja2.Template(TEMPLATE.read_text(), keep_trailing_newline=True).render(
        apply_patch_python=str(PYTHON), apply_patch_engine_dir=str(ROOT), ansible_managed="rendered by a test")
    path = tmp_path / "libcare-ctl"
    path.write_text(text)
    path.chmod(0o755)
    return path


def _run(launcher: Path, argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(launcher), *argv], capture_output=True, text=True, cwd=cwd, timeout=120,
                          check=False, env={**os.environ, **env})


class FakeService:
    """A listening socket that answers every request with a fixed answer and keeps what it got."""

    def __init__(self, path: Path) -> None:
        self.requests: list[tuple[str, list[str]]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                data = b""
                while chunk := connection.recv(4096):
                    data += chunk
                self.requests.append(protocol.decode_request(data))
                connection.sendall(protocol.encode_answer(7, "from the service\n", "a warning\n"))

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=10)


@pytest.fixture
def service(tmp_path):
    fake = FakeService(tmp_path / "ctl.sock")
    yield fake
    fake.close()


@pytest.mark.parametrize("command", ["info", "patch-user"])
def test_a_forwarded_command_goes_through_the_listening_socket(launcher, service, tmp_path, command):
    run = _run(launcher, [command, "-p", "1"], tmp_path, LIBCARE_SOCKET=str(tmp_path / "ctl.sock"))
    assert (run.returncode, run.stdout, run.stderr) == (7, "from the service\n", "a warning\n")
    assert service.requests == [(str(tmp_path), [command, "-p", "1"])]


def test_other_commands_and_no_service_run_the_full_command_line(launcher, service, tmp_path):
    own = str(os.getpid())
    for argv, env in ((["info", "-p", own, "-s", ""], {"LIBCARE_NO_SERVICE": "1"}),
                      (["info", "-p", own, "-s", ""], {"LIBCARE_SOCKET": str(tmp_path / "none.sock")}),
                      (["-h"], {})):
        run = _run(launcher, argv, tmp_path, **{"LIBCARE_SOCKET": str(tmp_path / "ctl.sock"), **env})
        assert run.returncode == 0, run.stderr
        assert f"pid={own}" in run.stdout if argv[0] == "info" else "usage: libcare-ctl" in run.stdout
    assert service.requests == []


def test_a_path_that_is_not_a_socket_runs_the_command_here(launcher, tmp_path):
    (tmp_path / "plain").write_text("")
    run = _run(launcher, ["info", "-p", str(os.getpid()), "-s", ""], tmp_path, LIBCARE_SOCKET=str(tmp_path / "plain"))
    assert run.returncode == 0, run.stderr
    assert f"pid={os.getpid()}" in run.stdout


def test_pythons_environment_variables_and_the_working_directory_are_ignored(launcher, tmp_path):
    """A package the engine imports (elftools), put in PYTHONPATH or the working directory,
    is not imported instead of the interpreter's own."""
    marker = tmp_path / "hijacked"
    for where in (tmp_path / "evil", tmp_path):
        (where / "elftools").mkdir(parents=True)
        (where / "elftools" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    run = _run(launcher, ["info", "-p", str(os.getpid()), "-s", ""], tmp_path, PYTHONPATH=str(tmp_path / "evil"),
               LIBCARE_NO_SERVICE="1")
    assert not marker.exists()
    assert run.returncode == 0, run.stderr
