"""libcare-patch-make builds through our wrappers unless the user names a compiler."""

from plugins.module_utils.careengine.patchbuild.patchmake import with_default_compiler


def test_default_compilers_are_our_wrappers(tmp_path):
    for tool in ("libcare-cc", "libcare-c++"):
        (tmp_path / tool).write_text("")
    assert with_default_compiler(["V=1"], str(tmp_path)) == [
        "V=1", f"CC={tmp_path}/libcare-cc", f"CXX={tmp_path}/libcare-c++"]


def test_user_compiler_is_kept(tmp_path):
    (tmp_path / "libcare-cc").write_text("")
    assert with_default_compiler(["CC=/opt/cc"], str(tmp_path)) == ["CC=/opt/cc"]
