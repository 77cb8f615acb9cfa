"""The owner and mode rules of store_permissions on real files, directories and symlinks.

Each test lays out a store in a root-owned 0700 temporary directory (pytest's), breaks one
rule with chown/chmod and checks that exactly that path is named, with its owner and mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from plugins.module_utils.careengine.errors import InsecureStore, StoreError
from plugins.module_utils.careengine.store_permissions import check_patch_source, find_unsafe_path

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")

NOBODY = 65534
BUILD_ID = "ab" * 20


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    """A root-owned 0755 directory under pytest's root-only temporary tree."""
    base = tmp_path / "base"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    return base


def make_store(where: Path) -> Path:
    """``where``/store with one level, a ``latest`` link, a flat patch and SHA256SUMS."""
    store = where / "store"
    level = store / BUILD_ID / "1"
    level.mkdir(parents=True)
    (level / "kpatch.bin").write_bytes(b"KPATCH1")
    os.symlink("1", store / BUILD_ID / "latest")
    (store / ("cd" * 20 + ".kpatch")).write_bytes(b"KPATCH1")
    (store / "SHA256SUMS").write_text("")
    (store / "SHA256SUMS.sig").write_text("")
    return store


def unsafe(path: Path) -> tuple[str, str, str]:
    found = find_unsafe_path(str(path))
    assert found is not None, f"{path} was accepted"
    return found.path, found.owner, found.problem


def test_a_root_owned_store_passes(root_dir):
    store = make_store(root_dir)
    assert find_unsafe_path(str(store)) is None
    check_patch_source(str(store))                          # does not raise


@pytest.mark.parametrize("relative", ["", "{id}", "{id}/1", "{id}/1/kpatch.bin", "SHA256SUMS", "SHA256SUMS.sig",
                                      "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd.kpatch"])
@pytest.mark.parametrize("bits, problem", [(stat.S_IWGRP, "writable by group"), (stat.S_IWOTH, "writable by others")])
def test_anything_of_the_store_writable_by_others_is_named(root_dir, relative, bits, problem):
    store = make_store(root_dir)
    target = store / relative.format(id=BUILD_ID) if relative else store
    os.chmod(target, stat.S_IMODE(os.stat(target).st_mode) | bits)
    assert unsafe(store) == (str(target), "root", problem)


@pytest.mark.parametrize("relative", ["", "{id}/1", "{id}/1/kpatch.bin", "SHA256SUMS"])
def test_anything_of_the_store_owned_by_another_user_is_named(root_dir, relative):
    store = make_store(root_dir)
    target = store / relative.format(id=BUILD_ID) if relative else store
    os.chown(target, NOBODY, NOBODY)
    assert unsafe(store) == (str(target), "nobody", "not owned by root")


def test_a_user_owned_directory_above_the_store_is_named(root_dir):
    store = make_store(root_dir)
    os.chown(root_dir, NOBODY, NOBODY)                      # mode 0755: only the owner could change it
    assert unsafe(store) == (str(root_dir), "nobody", "not owned by root")


def test_a_world_writable_directory_above_is_named_unless_sticky(root_dir):
    store = make_store(root_dir)
    os.chmod(root_dir, 0o777)
    assert unsafe(store) == (str(root_dir), "root", "writable by group and others")
    os.chmod(root_dir, 0o1777)                              # like /tmp: nobody can rename the store away
    assert find_unsafe_path(str(store)) is None


def test_a_sticky_store_itself_is_still_refused(root_dir):
    store = make_store(root_dir)
    os.chmod(store, 0o1777)                                 # anyone could add a patch to it
    assert unsafe(store)[0] == str(store)


def test_the_message_names_path_owner_and_mode(root_dir):
    store = make_store(root_dir)
    os.chmod(store / "SHA256SUMS", 0o664)
    with pytest.raises(InsecureStore) as refused:
        check_patch_source(str(store))
    message = str(refused.value)
    assert f"{store}/SHA256SUMS (owner root, mode 0664) is writable by group" in message
    assert "\n" not in message and "--insecure-store" in message


def test_nothing_is_checked_for_another_user(root_dir):
    store = make_store(root_dir)
    os.chmod(store, 0o777)
    check_patch_source(str(store), euid=1000)               # does not raise
    with pytest.raises(InsecureStore):
        check_patch_source(str(store), euid=0)


def test_a_level_linked_to_a_user_directory_is_named(root_dir):
    store = make_store(root_dir)
    elsewhere = root_dir / "home-alice"
    (elsewhere / "2").mkdir(parents=True)
    (elsewhere / "2" / "kpatch.bin").write_bytes(b"KPATCH1")
    os.chown(elsewhere, NOBODY, NOBODY)
    os.symlink(elsewhere / "2", store / BUILD_ID / "2")
    assert unsafe(store) == (str(elsewhere), "nobody", "not owned by root")


def test_a_patch_in_a_user_directory_reached_by_a_root_link_is_named(root_dir):
    store = make_store(root_dir)
    (root_dir / "user").mkdir()
    (root_dir / "user" / "evil.bin").write_bytes(b"KPATCH1")
    os.chown(root_dir / "user" / "evil.bin", NOBODY, NOBODY)
    os.unlink(store / BUILD_ID / "1" / "kpatch.bin")
    os.symlink(root_dir / "user" / "evil.bin", store / BUILD_ID / "1" / "kpatch.bin")
    assert unsafe(store) == (str(root_dir / "user" / "evil.bin"), "nobody", "not owned by root")


def test_a_symlink_owned_by_another_user_is_named(root_dir):
    os.chmod(root_dir, 0o1777)                              # a sticky /tmp-like directory
    store = make_store(root_dir / "real")
    link = root_dir / "store-link"
    os.symlink(store, link)
    assert find_unsafe_path(str(link)) is None
    os.lchown(link, NOBODY, NOBODY)                         # its owner could replace it in a sticky directory
    assert unsafe(link) == (str(link), "nobody", "not owned by root")


def test_symlinks_are_followed_through_every_directory_on_the_way(root_dir):
    store = make_store(root_dir / "a" / "b")
    (root_dir / "links").mkdir()
    os.symlink(root_dir / "a", root_dir / "links" / "to-a")
    via = root_dir / "links" / "to-a" / "b" / "store"
    assert find_unsafe_path(str(via)) is None
    os.chmod(root_dir / "a" / "b", 0o775)                   # on the way only through the link
    assert unsafe(via) == (str(root_dir / "a" / "b"), "root", "writable by group")
    os.chmod(root_dir / "a" / "b", 0o755)
    os.chmod(root_dir / "links", 0o777)                     # the link's own directory
    assert unsafe(via)[0] == str(root_dir / "links")
    assert str(store).endswith("a/b/store")


def test_dot_dot_is_resolved_after_the_symlink(root_dir):
    make_store(root_dir / "real" / "inner")
    (root_dir / "lnk").mkdir()
    os.symlink(root_dir / "real" / "inner", root_dir / "lnk" / "x")
    os.chmod(root_dir / "real", 0o777)
    # lnk/x/.. is real/, not lnk/: the world-writable real/ is on the way
    assert unsafe(root_dir / "lnk" / "x" / ".." / "inner" / "store")[0] == str(root_dir / "real")


def test_a_single_patch_file_and_the_sums_beside_it(root_dir):
    store = make_store(root_dir)
    patch = store / BUILD_ID / "1" / "kpatch.bin"
    assert find_unsafe_path(str(patch)) is None
    (patch.parent / "SHA256SUMS").write_text("")
    os.chmod(patch.parent / "SHA256SUMS", 0o666)
    assert unsafe(patch) == (str(patch.parent / "SHA256SUMS"), "root", "writable by group and others")
    os.chmod(patch.parent / "SHA256SUMS", 0o644)
    os.chown(patch, NOBODY, 0)
    assert unsafe(patch) == (str(patch), "nobody", "not owned by root")


def test_a_relative_path_is_checked_from_the_working_directory(root_dir, monkeypatch):
    make_store(root_dir)
    monkeypatch.chdir(root_dir)
    assert find_unsafe_path("store") is None
    os.chmod(root_dir, 0o757)
    assert unsafe(Path("store")) == (str(root_dir), "root", "writable by others")


def test_a_symlink_loop_is_an_error(root_dir):
    store = make_store(root_dir)
    os.symlink("loop-b", store / "loop-a")
    os.symlink("loop-a", store / "loop-b")
    with pytest.raises(StoreError, match="too many levels of symbolic links"):
        find_unsafe_path(str(store))


def test_a_missing_source_and_dangling_links_are_left_to_the_caller(root_dir):
    store = make_store(root_dir)
    assert find_unsafe_path(str(root_dir / "nothing")) is None
    os.symlink(root_dir / "gone", store / "dangling")
    assert find_unsafe_path(str(store)) is None
