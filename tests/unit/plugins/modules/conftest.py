"""Table-driven tests of the Ansible modules.

Each ``test_<module>.py`` is one line; its cases are in ``test_<module>.yaml`` beside it::

    - id: present_applies
      engine: recorded         # or: real (built demo program, real processes, real ptrace)
      steps:                    # or a single step's keys at the case level
        - input: {store: "{store}", pid: "{pid}"}
          flags: {check: true, diff: true}
          engine_result: ...    # recorded cases: what the engine returns
          output: {changed: true, counts: {applied: 1}}   # a subset of the module result
          failed: false
          calls: {patch_processes: {check: true}}          # recorded: what the engine was asked
          behaviour: buggy      # real: what the process prints afterwards (buggy | fixed)

Placeholders ``{pid}``, ``{store}``, ``{src}``, ``{dest}``, ``{build_id}``, ``{patch}``, ``{binary}``
are replaced by the values of the case's fixture; a string that is only a placeholder takes the
value's type (``"{pid}"`` becomes an int).

The modules run in-process: the repository is made importable as the collection
``ansible_collections.libcare.livepatch`` through a symlink under ``tests/output/``.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
COLLECTIONS = os.path.join(REPO, "tests", "output", "unit-collections")
COLLECTION = "ansible_collections.libcare.livepatch"
DEMO = os.path.join(REPO, "demo")


def _make_collection_importable() -> None:
    link = os.path.join(COLLECTIONS, "ansible_collections", "libcare", "livepatch")
    if os.path.realpath(link) != REPO:
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(REPO, link)
    if COLLECTIONS not in sys.path:
        sys.path.insert(0, COLLECTIONS)


_make_collection_importable()

from ansible.module_utils import basic  # noqa: E402
from ansible.module_utils.testing import patch_module_args  # noqa: E402


class AnsibleExitJson(Exception):
    """The module called exit_json."""


class AnsibleFailJson(Exception):
    """The module called fail_json."""


def _exit_json(self, **kwargs):
    kwargs.setdefault("changed", False)
    raise AnsibleExitJson(kwargs)


def _fail_json(self, msg="", **kwargs):
    kwargs["failed"] = True
    kwargs["msg"] = msg
    raise AnsibleFailJson(kwargs)


def engine_module(name: str):
    """A careengine module through the collection path (an import error fails the test)."""
    return importlib.import_module(f"{COLLECTION}.plugins.module_utils.careengine.{name}")


# ---------------------------------------------------------------------------------------
# placeholders and comparison


_PLACEHOLDER = re.compile(r"^\{(\w+)\}$")


def substitute(value, names: dict):
    """``value`` with ``{name}`` placeholders replaced (recursively)."""
    if isinstance(value, str):
        whole = _PLACEHOLDER.match(value)
        if whole and whole.group(1) in names:
            return names[whole.group(1)]
        return re.sub(r"\{(\w+)\}", lambda m: str(names.get(m.group(1), m.group(0))), value)
    if isinstance(value, list):
        return [substitute(item, names) for item in value]
    if isinstance(value, dict):
        return {key: substitute(item, names) for key, item in value.items()}
    return value


def assert_subset(expected, actual, where="result"):
    """Every key of ``expected`` is in ``actual`` with the same value (lists: same length, elementwise)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected a dict, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}: no key {key!r} in {sorted(actual)}"
            assert_subset(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: expected {expected!r}, got {actual!r}"
        for index, (item, got) in enumerate(zip(expected, actual, strict=True)):
            assert_subset(item, got, f"{where}[{index}]")
    elif isinstance(expected, str) and expected.startswith("~"):
        assert isinstance(actual, str) and re.search(expected[1:], actual), f"{where}: {actual!r} !~ {expected[1:]!r}"
    else:
        assert expected == actual, f"{where}: expected {expected!r}, got {actual!r}"


# ---------------------------------------------------------------------------------------
# recorded engine: the module's engine functions replaced by ones answering from the case


class RecordedEngine:
    """Answers the module's engine calls from a step's ``engine_result`` and records the calls."""

    def __init__(self, results_module, names: dict):
        self.results = results_module
        self.names = names
        self.step: dict = {}
        self.calls: dict[str, list[dict]] = {}

    def _record(self, function, **kwargs):
        self.calls.setdefault(function, []).append(kwargs)
        return substitute(self.step.get("engine_result", {}).get(function), self.names)

    def _process_results(self, data):
        if isinstance(data, dict) and "error" in data and set(data) == {"error"}:
            raise _care_error(data["error"])
        return [
            self.results.ProcessResult(
                pid=p["pid"], comm=p["comm"], error=p.get("error", ""), paused_us=p.get("paused_us"),
                objects=tuple(
                    self.results.ObjectResult(**dict(o, functions=tuple(o.get("functions", ()))))
                    for o in p.get("objects", ())
                ),
            )
            for p in data or ()
        ]

    def select_pids(self, *, pid=None, pids=None, exe=None, name=None):
        data = self._record("select_pids", pid=pid, pids=pids, exe=exe, name=name)
        if isinstance(data, dict) and set(data) == {"error"}:
            raise _care_error(data["error"])
        return data

    def patch_processes(self, source, pids=None, *, level=None, timeout=5.0, retries=0, check=False,
                        requested_by=None, audit_log=None, insecure_store=False, **integrity):
        data = self._record("patch_processes", source=source, pids=pids, level=level, timeout=timeout,
                            retries=retries, check=check, requested_by=_requester(requested_by),
                            audit_log=audit_log, insecure_store=insecure_store, **integrity)
        return self._process_results(data)

    def unpatch_processes(self, pids=None, build_ids=None, *, timeout=5.0, check=False, requested_by=None,
                          audit_log=None):
        data = self._record("unpatch_processes", pids=pids, build_ids=build_ids, timeout=timeout, check=check,
                            requested_by=_requester(requested_by), audit_log=audit_log)
        return self._process_results(data)

    def info_processes(self, pids=None, source=None):
        data = self._record("info_processes", pids=pids, source=source)
        return [
            self.results.ProcessInfo(
                pid=p["pid"], comm=p["comm"], unpatchable=p.get("unpatchable", ""),
                objects=tuple(
                    self.results.ObjectInfo(**dict(o, functions=tuple(o.get("functions", ()))))
                    for o in p.get("objects", ())
                ),
            )
            for p in data or ()
        ]

    def patch_source(self, path, *, verify=True):
        engine = self

        class Source:
            def build_ids(self):
                return engine._record("PatchSource.build_ids", path=path, verify=verify)

        return Source()

    def build_patches(self, src, patches, dest=None, make_args=(), jobs=None, clean=False, sign_key=None):
        data = self._record("build_patches", src=src, patches=list(patches), dest=dest,
                            make_args=list(make_args), jobs=jobs, clean=clean, sign_key=sign_key)
        if set(data) == {"error"}:
            raise _care_error(data["error"])
        for relative, content in (data.get("writes") or {}).items():
            path = os.path.join(src, relative)
            with open(path, "wb") as stream:
                stream.write(b"\x7fELF" + os.urandom(16) if content == "elf" else os.urandom(16).hex().encode())
        built = []
        for patch in data.get("patches", ()):
            os.makedirs(os.path.dirname(patch["path"]), exist_ok=True)
            with open(patch["path"], "wb") as stream:
                stream.write(b"KPATCH1")
            built.append(type("BuiltPatch", (), dict(patch, new_functions=patch.get("new_functions", []))))
        if dest is not None and os.path.isdir(dest):
            engine_module("integrity").write_sums(dest)     # as the real build does
        return type("BuildResult", (), {"patches": tuple(built)})


def _requester(requested_by):
    """The audit requester a module passed, as a dict a case can compare (None when none was)."""
    return None if requested_by is None else requested_by.to_json()


def _care_error(message):
    errors = engine_module("errors")
    return errors.CareError(message)


# ---------------------------------------------------------------------------------------
# real engine: the demo program built once per session, one fresh process per case


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """The demo program built by the engine with its fix: ``{src, store, build_id, patch, binary}``."""
    build_api = engine_module("patchbuild.project_build")
    root = tmp_path_factory.mktemp("demo-build")
    src = str(root / "src")
    shutil.copytree(DEMO, src)
    store = str(root / "store")
    result = build_api.build_patches(src, [os.path.join(src, "fix.patch")], dest=store,
                                     make_args=[f"CC={os.path.join(REPO, 'bin', 'libcare-cc')}"])
    assert len(result.patches) == 1, result
    built = result.patches[0]
    binary = built.object if os.path.isabs(built.object) else os.path.join(src, built.object)
    return {"src": src, "store": store, "build_id": built.build_id, "patch": built.path, "binary": binary}


class DemoProcess:
    """A running demo program whose output lines we can read."""

    def __init__(self, binary: str):
        self.popen = subprocess.Popen([binary, "20"], stdout=subprocess.PIPE, text=True)
        self.pid = self.popen.pid
        self.latest_line()

    def latest_line(self) -> str:
        """A line printed after this call (skipping lines already buffered)."""
        deadline = time.monotonic() + 0.08
        line = self.popen.stdout.readline()
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline()
        return line.strip()

    def stop(self):
        self.popen.kill()
        self.popen.wait()


BEHAVIOUR = {"buggy": "libcare-demo: 2 + 3 = -1", "fixed": "libcare-demo: 2 + 3 = 5"}


# ---------------------------------------------------------------------------------------
# the case runner


class ModuleCase:
    def __init__(self, module_name: str, case: dict, request):
        self.module_name = module_name
        self.case = case
        self.request = request

    def run(self, monkeypatch, tmp_path):
        module = importlib.import_module(f"{COLLECTION}.plugins.modules.{self.module_name}")
        monkeypatch.setattr(basic.AnsibleModule, "exit_json", _exit_json)
        monkeypatch.setattr(basic.AnsibleModule, "fail_json", _fail_json)
        names = {"tmp": str(tmp_path)}
        process = None
        recorded = None
        kind = self.case.get("engine", "recorded")
        if kind == "real":
            if self.module_name == "livepatch_build":
                names["src"] = str(tmp_path / "src")
                shutil.copytree(DEMO, names["src"])
                names["dest"] = str(tmp_path / "store")
            else:
                names.update(self.request.getfixturevalue("demo_build"))
                process = DemoProcess(names["binary"])
                names["pid"] = process.pid
                if self.case.get("patched_before"):
                    apply_api = engine_module("apply.operations")
                    before = apply_api.patch_processes(names["store"], [process.pid])
                    assert before and before[0].ok, before
        else:
            results_module = engine_module("results")
            names.update(pid=4242, store=str(tmp_path / "store"), build_id="ab" * 20,
                         src=str(tmp_path / "src"), dest=str(tmp_path / "store"))
            if self.module_name == "livepatch_build":
                shutil.copytree(DEMO, names["src"])
            names["patch"] = os.path.join(DEMO, "fix.patch")
            recorded = RecordedEngine(results_module, names)
            monkeypatch.setattr(module, "ENGINE_IMPORT_ERROR", None)
            for function in ("select_pids", "patch_processes", "unpatch_processes", "info_processes",
                             "build_patches"):
                monkeypatch.setattr(module, function, getattr(recorded, function), raising=False)
            monkeypatch.setattr(module, "PatchSource", recorded.patch_source, raising=False)
            # the real ones, in case the engine's apply API (imported first) is not there yet
            monkeypatch.setattr(module, "CareError", engine_module("errors").CareError, raising=False)
            monkeypatch.setattr(module, "summarize_results", results_module.summarize_results, raising=False)
        try:
            steps = self.case.get("steps") or [self.case]
            for number, step in enumerate(steps):
                self.run_step(module, step, names, recorded, process, f"step {number}")
        finally:
            if process is not None:
                process.stop()

    def run_step(self, module, step, names, recorded, process, where):
        for relative, content in (step.get("edit") or {}).items():
            with open(os.path.join(names["src"], relative), "w") as stream:
                stream.write(content)
        for path in substitute(step.get("remove") or [], names):
            os.unlink(path)
        args = substitute(dict(step.get("input") or {}), names)
        flags = step.get("flags") or {}
        args["_ansible_check_mode"] = bool(flags.get("check"))
        args["_ansible_diff"] = bool(flags.get("diff"))
        if recorded is not None:
            recorded.step = step
            recorded.calls = {}
        with patch_module_args(args):
            with pytest.raises((AnsibleExitJson, AnsibleFailJson)) as outcome:
                module.main()
        result = outcome.value.args[0]
        expect_failed = bool(step.get("failed", False))
        assert bool(result.get("failed")) == expect_failed, f"{where}: {result}"
        assert_subset(substitute(step.get("output") or {}, names), result, where)
        if "diff" in step:
            assert_subset(substitute(step["diff"], names), result.get("diff"), f"{where}.diff")
        if recorded is not None:
            for name, expected in (step.get("calls") or {}).items():
                made = recorded.calls.get(name, [])
                if expected is None:
                    assert not made, f"{where}: {name} must not be called, was called with {made}"
                else:
                    assert made, f"{where}: {name} was not called"
                    assert_subset(substitute(expected, names), made[-1], f"{where}: {name}()")
        if process is not None and "behaviour" in step:
            assert process.latest_line() == BEHAVIOUR[step["behaviour"]], where


def pytest_generate_tests(metafunc):
    """Parametrize ``module_case`` with the cases of the YAML file beside the test module."""
    if "module_case" not in metafunc.fixturenames:
        return
    table = os.path.splitext(metafunc.module.__file__)[0] + ".yaml"
    with open(table) as stream:
        cases = yaml.safe_load(stream)
    module_name = os.path.basename(os.path.splitext(table)[0])[len("test_"):]
    metafunc.parametrize(
        "module_case", [(module_name, case) for case in cases], ids=[case["id"] for case in cases], indirect=True)


@pytest.fixture
def module_case(request, monkeypatch, tmp_path):
    module_name, case = request.param
    return lambda: ModuleCase(module_name, case, request).run(monkeypatch, tmp_path)
