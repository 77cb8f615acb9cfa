"""LibCare's KPCC_* settings as the wrapper reads them."""

from __future__ import annotations

import pytest

from plugins.module_utils.careengine.errors import BuildError
from plugins.module_utils.careengine.patchbuild.ccsettings import from_environment, split_list


def test_defaults_change_nothing():
    settings = from_environment({})
    assert settings.modify(["-O2", "-g", "-c", "a.c"]) == ["-O2", "-g", "-c", "a.c"]
    assert settings.debug == 0 and settings.ignore_changes == ()


def test_remove_and_append_like_libcare():
    settings = from_environment({"KPCC_REMOVE_ARGS": "-g;-Werror", "KPCC_APPEND_ARGS": "-DLIVE=1;-fno-ipa-sra"})
    assert settings.modify(["-g", "-O2", "-Werror", "-c", "-g", "a.c"]) == [
        "-O2", "-c", "a.c", "-DLIVE=1", "-fno-ipa-sra"]
    assert split_list(";a;;b;") == ["a", "b"]


def test_libcare_default_filter_and_patch_options_are_accepted():
    settings = from_environment({
        "KPCC_DBGFILTER_ARGS": "--dbg-filter;--dbg-filter-eh-frame;--dbg-filter-gcc-except-table;--os=rhel6",
        "KPCC_PATCH_ARGS": "--force-gotpcrel;--os=rhel6;--arch=x86_64;--ignore-changes=main.c:helper,other",
        "KPCC_DEBUG": "2"})
    assert settings.debug == 2
    assert settings.ignored_functions("src/main.c") == ("helper", "other")
    assert settings.ignored_functions("src/util.c") == ("other",)


@pytest.mark.parametrize("variable, value", [("KPCC_PATCH_ARGS", "--unlink-symbols=foo"),
                                             ("KPCC_DBGFILTER_ARGS", "--dbg-filter-cfi"),
                                             ("KPCC_DBGFILTER_ARGS", "--ignore-changes=foo")])
def test_unsupported_options_are_refused_by_name(variable, value):
    with pytest.raises(BuildError, match=value.split("=")[0]):
        from_environment({variable: value})
