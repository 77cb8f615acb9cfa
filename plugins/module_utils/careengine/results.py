"""Results of engine operations, shared by the CLI (``--json``) and the Ansible modules.

One :class:`ObjectResult` per (process, patched object); the JSON form of a run is
``{"processes": [ProcessResult.to_json(), ...], "summary": {...}}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class ObjectAction(str, Enum):  # noqa: UP042 (StrEnum is 3.11+; the targets run Python >= 3.10)
    """What happened to one object. A ``str`` so that ``--json`` output, the modules' results
    and comparisons with the plain strings stay exactly "applied", "skipped", "removed", "failed"."""

    APPLIED = "applied"
    SKIPPED = "skipped"
    REMOVED = "removed"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


ACTIONS = tuple(action.value for action in ObjectAction)


@dataclass(frozen=True)
class ObjectResult:
    """What happened to one object (executable or library) in one process."""

    path: str
    build_id: str
    action: ObjectAction             # a plain string is taken too (results read back from JSON)
    applied_level: int | None = None  # the level in force afterwards (None: no patch)
    previous_level: int | None = None  # the level in force before
    reason: str = ""
    paused_us: int | None = None     # time the patient was stopped for this change
    functions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", ObjectAction(self.action))

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        data = asdict(self)
        data["action"] = self.action.value
        data["functions"] = list(self.functions)
        return data


@dataclass(frozen=True)
class ProcessResult:
    """What happened to one process."""

    pid: int
    comm: str
    objects: tuple[ObjectResult, ...] = ()
    error: str = ""                  # a failure that concerns the whole process
    paused_us: int | None = None     # total time the process was stopped
    waited_us: int | None = None     # of that, time spent waiting for busy threads to leave replaced code
    thread_us: int | None = None     # time one thread was held for remote work, the others running (not paused)

    @property
    def ok(self) -> bool:
        return not self.error and all(o.action != ObjectAction.FAILED for o in self.objects)

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {
            "pid": self.pid,
            "comm": self.comm,
            "error": self.error,
            "paused_us": self.paused_us,
            "waited_us": self.waited_us,
            "thread_us": self.thread_us,
            "objects": [o.to_json() for o in self.objects],
        }


@dataclass(frozen=True)
class ObjectInfo:
    """One mapped ELF object of a process, as ``info`` reports it."""

    path: str
    build_id: str | None
    applied_level: int | None = None
    available_level: int | None = None
    functions: tuple[str, ...] = ()
    interrupted: str = ""            # patch mappings left by an interrupted run: "level2:1/2,level1:1/2"


@dataclass(frozen=True)
class ProcessInfo:
    """What ``info`` knows of one process, read without stopping it."""

    pid: int
    comm: str
    objects: tuple[ObjectInfo, ...] = ()
    unpatchable: str = ""            # why it cannot be patched, if so
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {
            "pid": self.pid,
            "comm": self.comm,
            "unpatchable": self.unpatchable,
            "objects": [dict(asdict(o), functions=list(o.functions)) for o in self.objects],
        }


def summarize_results(results: list[ProcessResult]) -> dict:
    """Counts per action over every object of every process (plus failed processes)."""
    counts = dict.fromkeys(ACTIONS, 0)
    for process in results:
        if process.error and not process.objects:
            counts[ObjectAction.FAILED.value] += 1
        for obj in process.objects:
            counts[obj.action.value] += 1
    return counts
