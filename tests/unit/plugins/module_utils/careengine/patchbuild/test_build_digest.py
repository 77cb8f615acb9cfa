"""patchbuild/digest.py: what makes a build out of date, on real files in a temporary tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from plugins.module_utils.careengine.patchbuild.digest import (
    BuildManifest,
    build_digest,
    file_digest,
    manifest_after_build,
    manifest_path,
    read_manifest,
    tree_files,
    write_manifest,
)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    (src / "main.c").write_text("int main(void) { return 0; }\n")
    (src / "lib" / "util.c").write_text("int util(void) { return 1; }\n")
    (src / "Makefile").write_text("all:\n")
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a/main.c\n+++ b/main.c\n")
    return src, patch


def test_tree_files_lists_sources_and_skips_build_state(tree, tmp_path):
    src, _ = tree
    (src / "main.o").write_bytes(b"object")
    (src / "libx.so.1").write_bytes(b"shared")
    (src / "lpmake").mkdir()
    (src / "lpmake" / "server").write_text("installed copy")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: main")
    store = src / "store"
    store.mkdir()
    (store / "patch.kpatch").write_bytes(b"KPATCH1\0")
    (src / "generated.h").write_text("#define X 1\n")
    (src / "link.c").symlink_to("main.c")

    files = tree_files(str(src), excluded={"generated.h"}, skip_dir=os.path.realpath(store))

    assert sorted(files) == ["Makefile", "lib/util.c", "link.c", "main.c"]
    assert files["link.c"] != files["main.c"]  # a symlink counts by its link text


def test_elf_files_are_not_sources(tree):
    src, _ = tree
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed (make setup installs it)")
    subprocess.run([gcc, "-o", str(src / "prog"), str(src / "main.c")], check=True)
    assert file_digest(str(src / "prog")) is None
    assert "prog" not in tree_files(str(src))


def test_digest_changes_with_sources_patches_and_make_args(tree):
    src, patch = tree
    files = tree_files(str(src))
    digest = build_digest(files, [str(patch)], ["CFLAGS=-O2"])
    assert build_digest(tree_files(str(src)), [str(patch)], ["CFLAGS=-O2"]) == digest

    assert build_digest(files, [str(patch)], ["CFLAGS=-O1"]) != digest
    patch.write_text("--- a/main.c\n+++ b/main.c\n@@ changed @@\n")
    assert build_digest(files, [str(patch)], ["CFLAGS=-O2"]) != digest
    (src / "lib" / "util.c").write_text("int util(void) { return 2; }\n")
    assert tree_files(str(src))["lib/util.c"] != files["lib/util.c"]


def test_manifest_round_trip_and_current(tree, tmp_path):
    src, patch = tree
    store = tmp_path / "store"
    store.mkdir()
    stored = store / "abc.kpatch"
    stored.write_bytes(b"KPATCH1\0")
    path = manifest_path(str(store), str(src))
    assert path == manifest_path(str(store), str(src) + "/.")  # one manifest per real source path
    assert os.path.dirname(path) == str(store)

    before = tree_files(str(src))
    (src / "config.h").write_text("#define BUILT 1\n")  # the build wrote it
    after = tree_files(str(src))
    built = [{"build_id": "abc", "path": str(stored), "level": 1, "object": "prog",
              "functions": ["main"], "new_functions": []}]
    manifest = manifest_after_build(str(src), [str(patch)], [], before, after, BuildManifest(), built)
    assert manifest.outputs == ("config.h",)
    write_manifest(path, manifest)

    again = read_manifest(path)
    assert again == manifest
    next_digest = build_digest(tree_files(str(src), again.outputs), [str(patch)], [])
    assert again.is_current(next_digest)
    assert not again.is_current("0" * 64)
    stored.unlink()
    assert not again.is_current(next_digest)  # a stored patch is gone: rebuild


def test_missing_or_damaged_manifest_reads_as_empty(tmp_path):
    assert read_manifest(str(tmp_path / "none.json")) == BuildManifest()
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{not json")
    assert read_manifest(str(damaged)) == BuildManifest()
    damaged.write_text(json.dumps(["a", "list"]))
    assert read_manifest(str(damaged)) == BuildManifest()
    assert not BuildManifest().is_current(BuildManifest().digest or "")
