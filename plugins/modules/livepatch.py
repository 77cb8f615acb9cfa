#!/usr/bin/python
# Copyright: libcare.livepatch contributors
# GNU General Public License v2.0 or later (GPL-2.0-or-later), hence also usable under v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: apply or remove live patches in running processes."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: livepatch
short_description: Apply or remove live patches in running processes
version_added: 0.1.0
description:
  - Applies binary patches (built by M(libcare.livepatch.livepatch_build) or C(libcare-patch-make))
    to running processes without restarting them, or removes them.
  - Each object a process maps (its executable and shared libraries) is matched to the patches
    by build-id. A process that already runs the requested level is skipped, so the module is
    idempotent.
  - The patients are stopped only while the patch is written and only after every thread's
    stack has been checked to be outside the functions being replaced.
author:
  - libcare.livepatch maintainers (!UNKNOWN)
options:
  store:
    description:
      - A patch store directory (C(<store>/<build-id>/<level>/kpatch.bin), C(<store>/<build-id>/latest)).
      - Mutually exclusive with O(patch); one of them is required.
    type: path
  patch:
    description:
      - A single patch file.
      - Mutually exclusive with O(store); one of them is required.
    type: path
  state:
    description:
      - V(present) applies the patches the source holds (the O(level), else the latest level).
      - V(absent) removes from the selected processes every applied patch whose build-id the
        source has a patch for.
    type: str
    choices: [present, absent]
    default: present
  level:
    description:
      - The patch level to apply, instead of the store's latest.
      - Ignored when O(state=absent).
    type: int
  timeout:
    description:
      - Seconds to wait for every thread to leave the functions being replaced before giving up
        on a process (it is then C(failed), never patched unsafely).
    type: float
    default: 5.0
  retries:
    description:
      - How many more times to try a process whose safety check timed out (O(state=present) only).
    type: int
    default: 0
  force_unsafe:
    description:
      - Patch a process that can switch stacks (coroutines) even when one of its stacks could not be
        found and might return into a replaced function. Dangerous; the result's reason says it was
        forced. Never overrides a thread or stack known to be inside a replaced function.
      - O(state=present) only.
    type: bool
    default: false
  insecure_store:
    description:
      - When running as root, a store or patch file that anyone but root could change (the store, a
        directory above it, a patch file, C(SHA256SUMS) or its signature not owned by root, or writable
        by group or others) is refused before any process is touched, naming the path, its owner and
        its mode. V(true) skips that check and says so in a warning; for tests and labs only.
      - Ignored when O(state=absent).
    type: bool
    default: false
  audit_log:
    description:
      - The audit log that gets one JSON line per patch applied or removed and per refusal (who asked -
        this module, the Ansible user and the controller's address; the process, build-id, level,
        the patch's sha256, outcome, reason and pause). The same goes to the system log.
      - Default C($LIBCARE_AUDIT_LOG), else C(/var/log/libcare/audit.jsonl) (created root-only).
        Nothing is logged in check mode.
    type: path
  allowed_signers:
    description:
      - An OpenSSH C(allowed_signers) file. The store's C(SHA256SUMS) must then be signed
        (C(SHA256SUMS.sig), namespace C(libcare-livepatch)) by a key it lists, or nothing is applied.
      - The signer is returned in RV(signer).
      - Mutually exclusive with O(no_verify); ignored when O(state=absent).
    type: path
  no_verify:
    description:
      - Every patch is checked against the C(SHA256SUMS) of its store (for O(patch), the one in the
        file's directory) before any process is touched; a patch not listed there or with another
        digest is refused. V(true) skips that check (patches built by LibCare's own tools) and
        says so in a warning. The patch is still validated against itself and its target object.
      - Ignored when O(state=absent).
    type: bool
    default: false
  allow_failures:
    description:
      - When V(false), the module fails if any process or object failed (every result is still returned).
      - When V(true), failures are only reported in RV(results) and RV(counts.failed).
    type: bool
    default: false
extends_documentation_fragment:
  - libcare.livepatch.livepatch
  - libcare.livepatch.livepatch.processes
  - libcare.livepatch.livepatch.attributes_apply
seealso:
  - module: libcare.livepatch.livepatch_info
  - module: libcare.livepatch.livepatch_build
"""

EXAMPLES = r"""
- name: Apply the latest patches of the store to every process that maps a patched object
  libcare.livepatch.livepatch:
    store: /var/lib/libcare

- name: Apply level 2 to the nginx workers only, waiting up to 10 s per process
  libcare.livepatch.livepatch:
    store: /var/lib/libcare
    name: '^nginx'
    level: 2
    timeout: 10
    retries: 2

- name: Apply one patch file to one process
  libcare.livepatch.livepatch:
    patch: /tmp/4a3bc5e0.kpatch
    pid: "{{ server_pid | int }}"

- name: Remove the store's patches from every process of one executable
  libcare.livepatch.livepatch:
    store: /var/lib/libcare
    exe: /usr/sbin/myserver
    state: absent

- name: See what would change, without stopping anything
  libcare.livepatch.livepatch:
    store: /var/lib/libcare
  check_mode: true
  diff: true
  register: livepatch_plan
"""

RETURN = r"""
results:
  description:
    - One entry per process and object the engine considered; a process that failed as a
      whole has one entry whose RV(results[].build_id) and RV(results[].path) are null.
  returned: always
  type: list
  elements: dict
  contains:
    pid:
      description: Process id.
      type: int
      sample: 4242
    comm:
      description: Command name of the process.
      type: str
      sample: server
    build_id:
      description: Build-id of the object (null when the process failed as a whole).
      type: str
      sample: 8e1f0a2c5b7d4e6f9a0b1c2d3e4f5a6b7c8d9e0f
    path:
      description: Path of the object in the process (null when the process failed as a whole).
      type: str
      sample: /usr/local/bin/server
    action:
      description: What happened (in check mode, what would happen).
      type: str
      sample: applied
      choices: [applied, skipped, removed, failed]
    reason:
      description: Why it was skipped or failed (empty otherwise).
      type: str
      sample: level 1 already applied
    paused_us:
      description: Microseconds the process was stopped for this change (null when it was not stopped).
      type: int
      sample: 830
    waited_us:
      description:
        - Of the process's stop, microseconds spent waiting for threads (and suspended stacks) to leave
          the code being replaced; a busy thread is run alone to its return out of it (null when the
          process was not stopped).
      type: int
      sample: 120
    applied_level:
      description: Patch level in force afterwards (null when none).
      type: int
      sample: 1
    previous_level:
      description: Patch level in force before (null when none).
      type: int
      sample: null
    functions:
      description: Functions replaced by the patch in this object.
      type: list
      elements: str
      sample: [handle_request]
signer:
  description: The principal (from O(allowed_signers)) whose key signed the store; null when not checked.
  returned: when O(state=present)
  type: str
  sample: builder@example.com
verified:
  description: Whether the patches were checked against the store's C(SHA256SUMS) (false with O(no_verify)).
  returned: when O(state=present)
  type: bool
  sample: true
counts:
  description:
    - How many objects had each outcome (in check mode, would have). A process that failed as a
      whole counts as one failure.
    - A dict rather than top-level keys because C(failed) is reserved in Ansible results.
  returned: always
  type: dict
  sample: {applied: 2, skipped: 1, removed: 0, failed: 0}
  contains:
    applied:
      description: Objects patched.
      type: int
    skipped:
      description: Objects already at the requested state.
      type: int
    removed:
      description: Patches removed.
      type: int
    failed:
      description: Objects or whole processes that failed.
      type: int
"""

import traceback  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.libcare.livepatch.plugins.module_utils.engine_import import (  # noqa: E402
    EngineImportError,
    fail_if_engine_missing,
)

ENGINE_IMPORT_ERROR = None
try:
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.apply.operations import (
        patch_processes,
        select_pids,
        unpatch_processes,
    )
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.audit import Requester
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.errors import CareError
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.integrity import (
        sums_directory,
        verify_signature,
    )
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.results import summarize_results
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.storage import PatchSource
except ImportError as exc:  # reported by main(), not at import time
    ENGINE_IMPORT_ERROR = EngineImportError(exc)
    CareError = Exception


def flatten_results(process_results):
    """One dict per (process, object); a process that failed as a whole gives one entry.

    A process the engine looked at but found nothing to patch in gives none (the counts
    do not count it either).
    """
    flat = []
    for process in process_results:
        if not process.objects:
            if not process.error:
                continue  # nothing in it to patch: not a result
            flat.append({
                "pid": process.pid, "comm": process.comm, "build_id": None, "path": None,
                "action": "failed", "reason": process.error,
                "paused_us": process.paused_us, "waited_us": process.waited_us,
                "applied_level": None, "previous_level": None,
                "functions": [],
            })
            continue
        for obj in process.objects:
            flat.append({
                "pid": process.pid, "comm": process.comm, "build_id": obj.build_id, "path": obj.path,
                "action": str(obj.action), "reason": obj.reason or process.error, "paused_us": obj.paused_us,
                "waited_us": process.waited_us,
                "applied_level": obj.applied_level, "previous_level": obj.previous_level,
                "functions": list(obj.functions),
            })
    return flat


def levels_text(results, key):
    """The diff side ``key`` (previous_level or applied_level): one line per process and object."""
    lines = []
    for entry in results:
        if entry["build_id"] is None:
            continue
        level = entry[key]
        state = "unpatched" if level is None else f"level {level}"
        lines.append(f"{entry['comm']}[{entry['pid']}] {entry['path']} {entry['build_id']}: {state}\n")
    return "".join(lines)


def failure_message(results, counts):
    """One line naming how many failed and the first reasons."""
    reasons = [f"{e['comm']}[{e['pid']}]: {e['reason'] or 'failed'}" for e in results if e["action"] == "failed"]
    shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
    return f"{counts['failed']} of {len(results)} patch operations failed: {shown}"


def run_module():
    module = AnsibleModule(
        argument_spec=dict(
            store=dict(type="path"),
            patch=dict(type="path"),
            pid=dict(type="int"),
            pids=dict(type="list", elements="int"),
            exe=dict(type="path"),
            name=dict(type="str"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            level=dict(type="int"),
            timeout=dict(type="float", default=5.0),
            retries=dict(type="int", default=0),
            force_unsafe=dict(type="bool", default=False),
            allow_failures=dict(type="bool", default=False),
            insecure_store=dict(type="bool", default=False),
            audit_log=dict(type="path"),
            allowed_signers=dict(type="path"),
            no_verify=dict(type="bool", default=False),
        ),
        mutually_exclusive=[("store", "patch"), ("allowed_signers", "no_verify")],
        required_one_of=[("store", "patch")],
        supports_check_mode=True,
    )
    fail_if_engine_missing(module, ENGINE_IMPORT_ERROR)

    params = module.params
    source = params["store"] or params["patch"]
    requester = Requester.from_ansible("libcare.livepatch.livepatch")
    if params["insecure_store"] and params["state"] == "present":
        module.warn(f"insecure_store: the owners and modes of {source} are NOT checked; whoever can write "
                    "there can run code as root in the patched processes")
    if params["force_unsafe"] and params["state"] == "present":
        module.warn("force_unsafe: a coroutine stack that could not be found may resume in a replaced "
                    "function's old code")
    if params["no_verify"] and params["state"] == "present":
        module.warn(f"no_verify: the patches in {source} are NOT checked against SHA256SUMS")
    integrity = {}
    try:
        pids = select_pids(pid=params["pid"], pids=params["pids"], exe=params["exe"], name=params["name"])
        if params["state"] == "present":
            process_results = patch_processes(
                source, pids, level=params["level"], timeout=params["timeout"],
                retries=params["retries"], check=module.check_mode, requested_by=requester,
                force_unsafe=params["force_unsafe"],
                audit_log=params["audit_log"], insecure_store=params["insecure_store"],
                verify=not params["no_verify"], allowed_signers=params["allowed_signers"])
            integrity = dict(verified=not params["no_verify"], signer=None)
            if params["allowed_signers"]:   # verified inside patch_processes (it refuses otherwise): name the signer
                integrity["signer"] = verify_signature(sums_directory(source), params["allowed_signers"])
        else:
            build_ids = PatchSource(source, verify=False).build_ids()   # removes; applies nothing
            process_results = unpatch_processes(
                pids, build_ids, timeout=params["timeout"], check=module.check_mode, requested_by=requester,
                audit_log=params["audit_log"])
    except CareError as exc:
        module.fail_json(msg=str(exc), exception=traceback.format_exc())

    counts = summarize_results(process_results)
    results = flatten_results(process_results)
    output = dict(
        changed=counts["applied"] + counts["removed"] > 0,
        results=results,
        counts=counts,
        **integrity,
    )
    if module._diff:
        output["diff"] = dict(
            before=levels_text(results, "previous_level"),
            after=levels_text(results, "applied_level"),
            before_header="applied patch levels before",
            after_header="applied patch levels after",
        )
    if counts["failed"] and not params["allow_failures"]:
        module.fail_json(msg=failure_message(results, counts), **output)
    module.exit_json(**output)


def main():
    run_module()


if __name__ == "__main__":
    main()
