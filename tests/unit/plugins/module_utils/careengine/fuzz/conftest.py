"""Seeds of the fuzz tests: real patches and their target objects, built once per session
by the engine's own build (real gcc, the nonpie and libdemo fixture projects)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from plugins.module_utils.careengine.patchbuild.project_build import build_patches

ROOT = Path(__file__).resolve().parents[6]
FIXTURES = ROOT / "tests" / "fixtures" / "projects"
CC = f"CC={ROOT / 'bin' / 'libcare-cc'}"

# Hypothesis keeps caches in .hypothesis/ of the working directory even without an example
# database: keep them out of the tree.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="libcare-hypothesis-"))


@dataclass(frozen=True)
class Seed:
    """A real patch file's bytes and the original object it was made for."""

    name: str
    raw: bytes
    target: Path


@pytest.fixture(scope="session")
def seeds(tmp_path_factory) -> tuple[Seed, ...]:
    found = []
    for project_name in ("nonpie", "libdemo"):
        project = Path(shutil.copytree(FIXTURES / project_name, tmp_path_factory.mktemp("fuzz") / project_name))
        result = build_patches(str(project), [str(project / "fix.patch")], make_args=[CC])
        for built in result.patches:
            found.append(Seed(f"{project_name}:{Path(built.object).name}", Path(built.path).read_bytes(),
                              Path(built.object)))
    assert len(found) >= 3, found
    return tuple(found)
