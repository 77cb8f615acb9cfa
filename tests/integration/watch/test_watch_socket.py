"""The control socket: root's, peers checked, the CLI goes through it; unpatch is respected."""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from watch_helpers import Service, until

from plugins.module_utils.careengine import integrity, patchfile
from plugins.module_utils.careengine.elf import read_build_id
from plugins.module_utils.careengine.storage import PatchStore


def test_socket_is_root_only_by_default(service):
    mode = os.stat(service.socket)
    assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o600 and mode.st_uid == 0


@pytest.fixture
def public_dir():
    """A directory every user can reach (pytest's own are root's only)."""
    path = Path(tempfile.mkdtemp(prefix="libcare-watch-test-", dir="/run"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_other_users_cannot_patch_or_unpatch_and_see_only_their_processes(store, tmp_path, project, programs,
                                                                          public_dir):
    service = Service(store, tmp_path, project, "--socket-group", "nogroup", socket_dir=public_dir)
    try:
        mode = os.stat(service.socket)
        assert stat.S_IMODE(mode.st_mode) == 0o660 and mode.st_gid == grp.getgrnam("nogroup").gr_gid
        mine = programs(str(project.greeter), "sleep", "60")
        assert mine.line(0) == "greeting FIXED"
        theirs = programs("sleep", "60", user="nobody")
        for command in (["patch", "-p", str(mine.pid), str(store)], ["unpatch", "-p", str(mine.pid)]):
            refused = service.ctl(*command, user="nobody")
            assert refused.returncode == 1 and "refused" in refused.stderr, refused
            assert len(refused.stderr.strip().splitlines()) == 1
        assert service.text().count("refused") >= 2
        seen = {p["pid"] for p in json.loads(service.ctl("info", "--json", "-s", "", user="nobody").stdout)["processes"]}
        assert theirs.pid in seen and mine.pid not in seen
        seen_by_root = {p["pid"] for p in json.loads(service.ctl("info", "--json", "-s", "").stdout)["processes"]}
        assert {theirs.pid, mine.pid} <= seen_by_root
        assert "patchlvl=1" in service.ctl("info", "-p", str(mine.pid)).stdout      # still patched
    finally:
        service.stop()


def test_unpatch_through_the_service_holds_until_a_new_level_is_published(service, store, project, programs):
    running = programs(str(project.greeter), "sleep", "60")
    assert running.line(0) == "greeting FIXED"
    removed = service.ctl("unpatch", "-p", str(running.pid))
    assert removed.returncode == 0 and "cancelled" in removed.stdout, removed
    build_id = read_build_id(str(project.greeter))
    assert (store / build_id / "unpatched").exists()
    assert programs(str(project.greeter)).line(0) == "greeting UNPATCHED"     # not re-applied at exec
    assert "patchlvl" not in service.ctl("info", "-p", str(running.pid)).stdout  # nor to the running one

    for path in project.patches.values():
        PatchStore(str(store)).install(patchfile.load_patch(str(path)), 2)
    integrity.write_sums(str(store))
    assert until(lambda: "patchlvl=2" in service.ctl("info", "-p", str(running.pid)).stdout), service.text()
    assert programs(str(project.greeter)).line(0) == "greeting FIXED"
    assert service.status()["patched_on_publish"] >= 1
