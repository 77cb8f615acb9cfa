"""One exception hierarchy for the whole engine.

Every error raised on purpose by careengine is a :class:`CareError`. Its message is one
line that names the problem and, where possible, what to do about it. Modules turn it
into ``fail_json(msg=...)``; the CLI into a one-line message and a non-zero exit.
"""

from __future__ import annotations


class CareError(Exception):
    """Base class of every error the engine raises on purpose."""

    exit_code = 1


class PatchFormatError(CareError):
    """A patch file is truncated, corrupt or not a patch at all."""


class StoreError(CareError):
    """The patch store is malformed or a patch conflicts with what it holds."""


class BuildIdMismatch(CareError):
    """A patch was made for another object than the one it is applied to."""


class BuildError(CareError):
    """The project build, a compiler run or patch extraction failed."""


class UnpatchableChange(CareError):
    """The source change cannot be live-patched (changed data, signature, ...)."""


class AsmParseError(CareError):
    """gcc's assembler output could not be understood."""


class ProcessGone(CareError):
    """The process (or one of its threads) does not exist or exited meanwhile."""


class PermissionDenied(CareError):
    """We may not trace or read the process."""


class ProcessError(CareError):
    """ptrace, a remote syscall or a memory access on the patient failed."""


class SymbolNotFound(CareError):
    """A symbol the patch needs is in none of the patient's objects."""


class UnsafeToPatch(CareError):
    """A thread stayed inside a function being replaced until the timeout."""


class NotApplicable(CareError):
    """Nothing in the process matches the patch (no object with that build-id)."""


class InsecureStore(CareError):
    """Someone other than root could change a patch before it is loaded (owner or mode of a path)."""


class AuditError(CareError):
    """The audit log cannot be written: nothing is done without a record of it."""


class SyscallForbidden(CareError):
    """The patient's seccomp policy would kill it or deny a system call the engine needs."""
