"""Cases: test_livepatch_build.yaml (run by conftest.py)."""


def test_livepatch_build(module_case):
    module_case()
