# Copyright: libcare.livepatch contributors
# GNU General Public License v2.0 or later (GPL-2.0-or-later), hence also usable under v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Documentation shared by the libcare.livepatch modules."""

from __future__ import annotations


class ModuleDocFragment:
    """Options and attributes shared by livepatch, livepatch_info and livepatch_build."""

    # Requirements of the modules that touch processes (livepatch, livepatch_info).
    DOCUMENTATION = r"""
options: {}
requirements:
  - Linux x86_64.
  - Python 3.10 or later on the managed host.
  - pyelftools, python-ptrace and capstone on the managed host (the C(libcare.livepatch.apply_patch)
    role installs them into a virtualenv, from the package index or from a directory of wheels).
  - The right to trace the processes (root, or the same uid and no Yama restriction;
    C(CAP_SYS_PTRACE) in a container for processes of another uid).
notes:
  - Patches are matched to processes by the build-id of the objects they map
    (the executable or a shared library), never by file name.
"""

    # How the modules that act on processes choose them.
    PROCESSES = r"""
options:
  pid:
    description:
      - Only this process.
    type: int
  pids:
    description:
      - Only these processes.
    type: list
    elements: int
  exe:
    description:
      - Only processes whose executable is this path (as C(/proc/PID/exe) shows it).
    type: path
  name:
    description:
      - Only processes whose command name (C(/proc/PID/comm)) matches this regular expression
        (Python C(re.search)).
    type: str
notes:
  - When none of O(pid), O(pids), O(exe) and O(name) is given, every process that maps an object
    whose build-id the patch source has a patch for is selected.
  - When several of them are given, a process must match all of them.
"""

    # Attributes of a module that changes running processes.
    ATTRIBUTES_APPLY = r"""
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - In check mode the processes are only read, never stopped; the result says exactly what
        would be applied, skipped or removed.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: full
    details:
      - The diff shows, per process and object, the patch level in force before and after.
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: full
    details:
      - A process that already runs the requested patch level is C(skipped).
"""

    # Attributes of a read-only module.
    ATTRIBUTES_INFO = r"""
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - This module never changes anything; it runs the same in check mode.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: N/A
    details:
      - This module never changes anything.
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: full
"""

    # Attributes of the build module.
    ATTRIBUTES_BUILD = r"""
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details:
      - In check mode nothing is built; the result says whether a build would run.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  idempotent:
    description: When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
    support: full
    details:
      - A build whose sources and patches have the digest of the last successful build, and whose
        patches are still in the store, is not run again.
"""
