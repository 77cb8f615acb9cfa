# Copyright: libcare.livepatch contributors
# GNU General Public License v2.0+ (see https://www.gnu.org/licenses/old-licenses/gpl-2.0.txt)
"""How the modules report an engine (careengine) that cannot be imported on a managed host."""

from __future__ import annotations

import traceback

from ansible.module_utils.basic import missing_required_lib

# The engine's third-party dependencies: import name -> package name.
REQUIRED_LIBS = {"elftools": "pyelftools", "ptrace": "python-ptrace", "capstone": "capstone"}


class EngineImportError:
    """An ImportError met while importing the engine: its traceback and the missing package, if known."""

    def __init__(self, error: ImportError) -> None:
        self.traceback = traceback.format_exc()
        self.missing_lib = REQUIRED_LIBS.get((error.name or "").split(".", maxsplit=1)[0])


def fail_if_engine_missing(module, import_error: EngineImportError | None) -> None:
    """``module.fail_json`` naming the missing package when the engine did not import."""
    if import_error is None:
        return
    if import_error.missing_lib:
        module.fail_json(msg=missing_required_lib(import_error.missing_lib), exception=import_error.traceback)
    module.fail_json(msg="cannot import the libcare engine", exception=import_error.traceback)
