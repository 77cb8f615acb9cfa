"""Which build system a tree has, and the commands each one runs."""

from __future__ import annotations

import pytest

from plugins.module_utils.careengine.errors import BuildError
from plugins.module_utils.careengine.patchbuild import buildsystems

WRAPPERS = buildsystems.Wrappers("/opt/lc/libcare-cc", "/opt/lc/libcare-c++")


@pytest.mark.parametrize("files, kind", [(["Makefile"], "make"), (["lpmakefile"], "make"),
                                         (["CMakeLists.txt"], "cmake"), (["meson.build"], "meson"),
                                         (["Makefile", "CMakeLists.txt"], "make")])
def test_detect(tmp_path, files, kind):
    for name in files:
        (tmp_path / name).write_text("")
    assert buildsystems.detect(str(tmp_path)) == kind


def test_nothing_to_build_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(BuildError, match="--build-cmd"):
        buildsystems.detect(str(tmp_path))


def test_cmake_configures_with_the_wrappers(tmp_path):
    (tmp_path / "CMakeLists.txt").write_text("")
    system = buildsystems.choose(str(tmp_path), str(tmp_path / "b"), WRAPPERS, jobs=2)
    (configure,) = system.configure()
    assert "-DCMAKE_C_COMPILER=/opt/lc/libcare-cc" in configure.argv
    assert "-DCMAKE_CXX_COMPILER=/opt/lc/libcare-c++" in configure.argv
    assert system.build().argv == ("cmake", "--build", str(tmp_path / "b"), "--parallel", "2")
    install = system.install(str(tmp_path / "root"))
    assert dict(install.environment)["DESTDIR"] == str(tmp_path / "root")
    assert system.needs_configure()


def test_meson_native_file_names_the_wrappers(tmp_path):
    (tmp_path / "meson.build").write_text("")
    system = buildsystems.choose(str(tmp_path), str(tmp_path / "w" / "b"), WRAPPERS)
    (setup,) = system.configure()
    native = (tmp_path / "w" / "b.native.ini").read_text()
    assert "c = '/opt/lc/libcare-cc'" in native and "cpp = '/opt/lc/libcare-c++'" in native
    assert setup.argv[:4] == ("meson", "setup", "--native-file", str(tmp_path / "w" / "b.native.ini"))
    assert "--destdir" in system.install("/r").argv


def test_custom_commands_go_together(tmp_path):
    with pytest.raises(BuildError, match="go together"):
        buildsystems.choose(str(tmp_path), str(tmp_path / "b"), WRAPPERS, build_command="./build.sh")
    system = buildsystems.choose(str(tmp_path), str(tmp_path / "b"), WRAPPERS, build_command="./build.sh",
                                 install_command="./install.sh")
    assert system.build().shell and system.build().argv == ("./build.sh",)
    assert dict(system.install("/r").environment)["DESTDIR"] == "/r"
    assert "MAKEFLAGS" not in dict(system.build().environment)


def test_custom_commands_get_the_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("MAKEFLAGS", "--no-print-directory")
    system = buildsystems.choose(str(tmp_path), str(tmp_path / "b"), WRAPPERS, jobs=3, build_command="make",
                                 install_command="make install")
    for step in (system.build(), system.install("/r")):
        environment = dict(step.environment)
        assert environment["MAKEFLAGS"] == "--no-print-directory -j3"
        assert environment["CMAKE_BUILD_PARALLEL_LEVEL"] == "3"


def test_make_passes_the_wrappers_unless_the_user_named_a_compiler(tmp_path):
    wrappers = buildsystems.Wrappers.beside(str(tmp_path))
    (tmp_path / "libcare-cc").write_text("")
    (tmp_path / "libcare-c++").write_text("")
    system = buildsystems.choose(str(tmp_path), str(tmp_path / "b"), wrappers, kind="make", extra_args=["CC=/x/cc"])
    assert system.build().argv == ("make", "CC=/x/cc", f"CXX={tmp_path}/libcare-c++")
    assert system.install("/r").argv[-2:] == ("install", "DESTDIR=/r")
