"""The wanted state: latest levels minus what an operator unpatched; the store's fingerprint."""

from __future__ import annotations

from plugins.module_utils.careengine.watch import wanted

BUILD_ID = "ab" * 20


def _level(store, level):
    directory = store / BUILD_ID / str(level)
    directory.mkdir(parents=True)
    (directory / "kpatch.bin").write_bytes(b"patch")
    latest = store / BUILD_ID / "latest"
    if latest.is_symlink():
        latest.unlink()
    latest.symlink_to(str(level))


def test_unpatched_level_is_not_wanted_until_another_level_is_published(tmp_path):
    _level(tmp_path, 1)
    assert wanted.wanted_levels(str(tmp_path)) == {BUILD_ID: 1}
    wanted.mark_unpatched(str(tmp_path), BUILD_ID, 1)
    assert wanted.wanted_levels(str(tmp_path)) == {}
    assert wanted.WantedStore(str(tmp_path)).find(BUILD_ID) is None
    _level(tmp_path, 2)
    assert wanted.wanted_levels(str(tmp_path)) == {BUILD_ID: 2}


def test_clearing_the_mark_wants_the_level_again(tmp_path):
    _level(tmp_path, 1)
    wanted.mark_unpatched(str(tmp_path), BUILD_ID, 1)
    assert wanted.clear_unpatched(str(tmp_path), BUILD_ID) is True
    assert wanted.clear_unpatched(str(tmp_path), BUILD_ID) is False
    assert wanted.wanted_levels(str(tmp_path)) == {BUILD_ID: 1}


def test_signature_changes_on_publish_and_on_unpatch(tmp_path):
    _level(tmp_path, 1)
    first = wanted.store_signature(str(tmp_path))
    assert wanted.store_signature(str(tmp_path)) == first
    wanted.mark_unpatched(str(tmp_path), BUILD_ID, 1)
    second = wanted.store_signature(str(tmp_path))
    assert second != first
    _level(tmp_path, 2)
    assert wanted.store_signature(str(tmp_path)) != second
