"""What the real-project test modules share: running their harness scripts under the
cache lock the module holds, keeping what the scripts print, and the prepare step."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SKIP_STATUS = 77        # the harness scripts' "sources unavailable"


@dataclass(frozen=True)
class RealProject:
    """One real project's harness: its scripts, cache, lock variable and output folder."""

    package: str            # the Debian source package
    scripts: Path
    cache: Path
    lock_variable: str      # tells the scripts that their caller holds the cache lock
    output: Path

    def run(self, command: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run ``command`` from the checkout; the caller holds the cache lock (see ``locked``)."""
        env = dict(os.environ, **{self.lock_variable: "1"})
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                              env=env)

    def record(self, name: str, text: str) -> None:
        """Keep ``text`` as ``name`` in the output folder (tests/output/...)."""
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / name).write_text(text)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Concurrent test runs share the cache: its lock, for as long as the block runs."""
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def prepare(self, timeout: float) -> None:
        """Run prepare.sh; skip the test if the sources cannot be fetched."""
        run = self.run(["bash", str(self.scripts / "prepare.sh")], timeout=timeout)
        if run.returncode == SKIP_STATUS:
            pytest.skip(f"{self.package} sources unavailable (apt-get source {self.package}): "
                        f"{run.stderr.strip()[-300:]}")
        assert run.returncode == 0, run.stderr[-3000:]
