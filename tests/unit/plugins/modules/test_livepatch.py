"""Cases: test_livepatch.yaml (run by conftest.py)."""


def test_livepatch(module_case):
    module_case()
