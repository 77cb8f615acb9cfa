"""The user's source tree while the patches are applied: checked first, always put back.

Three guarantees, whatever the project's own build does and however the run ends:

* :func:`check_patches` applies every patch, in order, to a scratch copy of the files
  they name, before anything is built: a missing patch or one that does not apply is
  reported in seconds and the tree is never touched;
* :class:`PatchedTree` keeps the original of every file a patch touches in a state
  directory **outside** the tree (:func:`state_dir_for`), so a ``make clean`` that wipes
  every untracked file or directory cannot take them away; a journal written before each
  change says what to put back;
* :meth:`PatchedTree.restore` puts the tree back byte for byte (with SIGINT/SIGTERM held
  off while it runs), and :func:`recover` does it at the start of the next run when the
  previous one was killed outright (SIGKILL, power loss).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..errors import BuildError

JOURNAL = "journal.json"
STATE_ENV = "LPMAKE_STATE_DIR"


def state_dir_for(srcdir: str) -> str:
    """Where the originals of ``srcdir``'s patched files are kept while it is patched.

    ``$LPMAKE_STATE_DIR`` if set, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/libcare-patch-make/<hash of the source dir>`` (``/tmp/libcare-patch-make-<uid>/...``
    when that cannot be created): outside the tree, stable across runs so a killed run
    can be recovered by the next one.
    """
    explicit = os.environ.get(STATE_ENV)
    if explicit:
        return os.path.abspath(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(os.path.realpath(srcdir).encode()).hexdigest()[:16]
    parent = os.path.join(cache, "libcare-patch-make")
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError:   # no writable home (a service account): a private dir under /tmp
        parent = os.path.join(tempfile.gettempdir(), f"libcare-patch-make-{os.getuid()}")
        os.makedirs(parent, mode=0o700, exist_ok=True)
        if os.stat(parent).st_uid != os.getuid():
            raise BuildError(f"{parent} belongs to another user: set {STATE_ENV} to a directory of yours") from None
    return os.path.join(parent, digest)


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP are delivered only after the block: a restore is never cut short."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def exclusive(srcdir: str, state_dir: str) -> Iterator[None]:
    """One run per source tree at a time: a second run would take the first one's patched
    files for a killed run's and restore them under its build. Raises :class:`BuildError`."""
    import fcntl

    os.makedirs(os.path.dirname(state_dir) or ".", exist_ok=True)
    lock_path = state_dir.rstrip("/") + ".lock"
    with open(lock_path, "w", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"another libcare-patch-make run is using {srcdir} (lock {lock_path}): "
                             "wait for it to finish") from None
        yield


def _run_patch(directory: str, patch_path: str, *options: str) -> subprocess.CompletedProcess:
    command = ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-i",
               os.path.abspath(patch_path), *options]
    try:
        return subprocess.run(command, cwd=directory, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, check=False)
    except OSError as exc:
        raise BuildError(f"cannot run patch: {exc.strerror}") from None


def _one_line(completed: subprocess.CompletedProcess) -> str:
    return (completed.stdout + completed.stderr).strip().replace("\n", "; ")


def named_files(patch_text: str) -> list[str]:
    """The paths (``-p1``: first component dropped) a unified diff reads or writes."""
    names: list[str] = []
    for line in patch_text.splitlines():
        if line.startswith(("--- ", "+++ ")):
            name = line[4:].split("\t", 1)[0].strip()
        elif line.startswith(("rename from ", "rename to ", "copy from ", "copy to ")):
            name = "x/" + line.split(" ", 2)[2].strip()
        else:
            continue
        name = _unquote(name)
        if name == "/dev/null" or "/" not in name:
            continue
        relative = name.split("/", 1)[1]
        if relative and relative not in names:
            names.append(relative)
    return names


def check_patches(srcdir: str, patches: Sequence[str]) -> None:
    """Apply ``patches`` in order to a scratch copy of the files they name; raise if one fails.

    The source tree is only read. Raises :class:`BuildError` naming the patch.
    """
    with tempfile.TemporaryDirectory(prefix="libcare-patch-check-") as scratch:
        for patch_path in patches:
            if not os.path.isfile(patch_path):
                raise BuildError(f"patch {patch_path} does not exist")
            try:
                with open(patch_path, encoding="utf-8", errors="surrogateescape") as stream:
                    text = stream.read()
            except OSError as exc:
                raise BuildError(f"cannot read patch {patch_path}: {exc.strerror}") from None
            for relative in named_files(text):
                source = os.path.join(srcdir, relative)
                copy = os.path.join(scratch, relative)
                if os.path.isfile(source) and not os.path.lexists(copy):
                    os.makedirs(os.path.dirname(copy), exist_ok=True)
                    shutil.copy2(source, copy)
            applied = _run_patch(scratch, patch_path)
            if applied.returncode:
                raise BuildError(f"patch {patch_path} does not apply to {srcdir}: {_one_line(applied)}")


class PatchedTree:
    """Patches applied to a source dir, with the originals kept in ``state_dir`` to put it back.

    Each patch is checked with ``patch --dry-run`` first (a patch that does not apply
    changes nothing); the files it will touch are copied to ``state_dir`` and noted in
    the journal before it is applied.
    """

    def __init__(self, srcdir: str, state_dir: str) -> None:
        self.srcdir = os.path.abspath(srcdir)
        self.state_dir = os.path.abspath(state_dir)
        self.saved: dict[str, str | None] = {}   # relative path -> backup file, None = did not exist
        self.created_dirs: list[str] = []         # relative dirs that did not exist, outermost first
        self.applied: list[str] = []

    @property
    def journal_path(self) -> str:
        return os.path.join(self.state_dir, JOURNAL)

    def apply(self, patch_path: str) -> None:
        """Apply one patch (-p1) after saving the files it touches."""
        if not os.path.isfile(patch_path):
            raise BuildError(f"patch {patch_path} does not exist")
        dry = _run_patch(self.srcdir, patch_path, "--dry-run")
        if dry.returncode:
            raise BuildError(f"patch {patch_path} does not apply to {self.srcdir}: {_one_line(dry)}")
        touched = [_unquote(line[len("checking file "):]) for line in dry.stdout.splitlines()
                   if line.startswith("checking file ")]
        for relative in touched:
            self._save(relative)
        self._write_journal()
        applied = _run_patch(self.srcdir, patch_path)
        if applied.returncode:
            raise BuildError(f"patch {patch_path} failed: {_one_line(applied)}")
        self.applied.append(patch_path)

    def _save(self, relative: str) -> None:
        if relative in self.saved:
            return
        source = os.path.join(self.srcdir, relative)
        if not os.path.lexists(source):
            self.saved[relative] = None
            self._note_missing_dirs(os.path.dirname(relative))
            return
        os.makedirs(self.state_dir, exist_ok=True)
        backup = os.path.join(self.state_dir, f"{len(self.saved)}.orig")
        shutil.copy2(source, backup, follow_symlinks=False)
        _fsync(backup)
        self.saved[relative] = backup

    def _note_missing_dirs(self, relative_dir: str) -> None:
        missing: list[str] = []
        while relative_dir and not os.path.isdir(os.path.join(self.srcdir, relative_dir)):
            missing.insert(0, relative_dir)
            relative_dir = os.path.dirname(relative_dir)
        for directory in missing:
            if directory not in self.created_dirs:
                self.created_dirs.append(directory)

    def _write_journal(self) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        record = {"srcdir": self.srcdir, "saved": self.saved, "created_dirs": self.created_dirs}
        temporary = self.journal_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(record, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.journal_path)

    def restore(self) -> None:
        """Put every saved file back (fresh mtime) and delete what the patches created.

        Runs with SIGINT/SIGTERM held off; the journal goes last, so a restore cut
        short by SIGKILL is finished by :func:`recover`.
        """
        with signals_held():
            for relative, backup in self.saved.items():
                target = os.path.join(self.srcdir, relative)
                if backup is None:
                    if os.path.lexists(target) and not os.path.isdir(target):
                        os.unlink(target)
                    continue
                _put_back(backup, target)
            for relative_dir in reversed(self.created_dirs):
                try:
                    os.rmdir(os.path.join(self.srcdir, relative_dir))
                except OSError:
                    pass   # not empty: the build put something there
            self.saved.clear()
            self.created_dirs.clear()
            self.applied.clear()
            if os.path.lexists(self.journal_path):
                os.unlink(self.journal_path)
            _remove_tree(self.state_dir)


def _put_back(backup: str, target: str) -> None:
    """Copy ``backup`` over ``target`` atomically; fresh mtime so make rebuilds it next time."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(backup):
        if os.path.lexists(target):
            os.unlink(target)
        os.symlink(os.readlink(backup), target)
        return
    temporary = f"{target}.lpmake-restore"
    shutil.copyfile(backup, temporary)
    shutil.copymode(backup, temporary)
    os.replace(temporary, target)
    os.utime(target)


def recover(srcdir: str, state_dir: str) -> bool:
    """Finish the restore of a run that was killed while ``srcdir`` was patched.

    Returns True when something was restored. A journal for another tree is refused.
    """
    journal = os.path.join(state_dir, JOURNAL)
    if not os.path.isfile(journal):
        return False
    try:
        with open(journal, encoding="utf-8") as stream:
            record = json.load(stream)
    except (OSError, ValueError) as exc:
        raise BuildError(f"cannot read the restore journal {journal}: {exc}; restore {srcdir} by hand "
                         "from the *.orig files beside it") from None
    if os.path.realpath(record.get("srcdir", "")) != os.path.realpath(srcdir):
        raise BuildError(f"the restore journal {journal} is for {record.get('srcdir')}, not {srcdir}")
    tree = PatchedTree(srcdir, state_dir)
    tree.saved = {str(k): v for k, v in record.get("saved", {}).items()}
    tree.created_dirs = list(record.get("created_dirs", []))
    missing = [b for b in tree.saved.values() if b is not None and not os.path.lexists(b)]
    if missing:
        raise BuildError(f"the restore journal {journal} names missing originals ({missing[0]}): "
                         f"restore {srcdir} by hand")
    tree.restore()
    return True


def _fsync(path: str) -> None:
    if os.path.islink(path):
        return
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


def _remove_tree(path: str) -> None:
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def _unquote(name: str) -> str:
    name = name.strip()
    if name[:1] in ("'", '"'):
        try:
            return shlex.split(name)[0]
        except ValueError:
            return name.strip("'\"")
    return name
