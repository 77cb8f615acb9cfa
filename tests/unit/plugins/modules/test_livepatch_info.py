"""Cases: test_livepatch_info.yaml (run by conftest.py)."""


def test_livepatch_info(module_case):
    module_case()
