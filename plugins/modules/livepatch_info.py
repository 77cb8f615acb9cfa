#!/usr/bin/python
# Copyright: libcare.livepatch contributors
# GNU General Public License v2.0 or later (GPL-2.0-or-later), hence also usable under v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: report live patches applied to (and available for) running processes."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: livepatch_info
short_description: Report live patches in running processes
version_added: 0.1.0
description:
  - Reports, per process, the objects it maps with their build-ids, the patch level applied
    to each and the level a patch source has for it, and which processes cannot be patched and why.
  - Reads process memory without stopping any process; never changes anything.
author:
  - libcare.livepatch maintainers (!UNKNOWN)
options:
  store:
    description:
      - A patch store directory; when given (or O(patch)), RV(processes[].objects[].available_level)
        is filled in and only processes that map an object the source has a patch for are reported.
      - Mutually exclusive with O(patch).
    type: path
  patch:
    description:
      - A single patch file, used like O(store).
      - Mutually exclusive with O(store).
    type: path
  audit_log:
    description:
      - The audit log to read when and by whom each applied patch was applied
        (RV(processes[].objects[].applied_at), RV(processes[].objects[].applied_by)).
      - Default C($LIBCARE_AUDIT_LOG), else C(/var/log/libcare/audit.jsonl).
    type: path
extends_documentation_fragment:
  - libcare.livepatch.livepatch
  - libcare.livepatch.livepatch.processes
  - libcare.livepatch.livepatch.attributes_info
seealso:
  - module: libcare.livepatch.livepatch
"""

EXAMPLES = r"""
- name: What is patched in the processes that map an object of the store
  libcare.livepatch.livepatch_info:
    store: /var/lib/libcare
  register: livepatch_state

- name: Show the applied levels
  ansible.builtin.debug:
    msg: "{{ item.pid }} {{ item.comm }}: {{ item.objects | map(attribute='applied_level') | list }}"
  loop: "{{ livepatch_state.processes }}"

- name: One process
  libcare.livepatch.livepatch_info:
    pid: 4242
"""

RETURN = r"""
processes:
  description: The processes that can be patched, with the objects the engine reports for them.
  returned: always
  type: list
  elements: dict
  contains:
    pid:
      description: Process id.
      type: int
      sample: 4242
    comm:
      description: Command name.
      type: str
      sample: server
    objects:
      description: Objects of the process (executable, libraries).
      type: list
      elements: dict
      contains:
        path:
          description: Path of the object.
          type: str
          sample: /usr/local/bin/server
        build_id:
          description: Build-id of the object (null when it has none).
          type: str
          sample: 8e1f0a2c5b7d4e6f9a0b1c2d3e4f5a6b7c8d9e0f
        applied_level:
          description: Patch level applied in the process (null when none).
          type: int
          sample: 1
        available_level:
          description: Level the patch source has for this build-id (null when none or no source given).
          type: int
          sample: 2
        functions:
          description: Functions replaced by the applied patch.
          type: list
          elements: str
          sample: [handle_request]
        applied_at:
          description: When the applied patch was applied (UTC, ISO 8601), from the audit log; null when unknown.
          type: str
          sample: "2026-12-02T06:03:20.123456Z"
        applied_by:
          description:
            - Who asked for the applied patch, from the audit log (null when unknown) - C(uid), C(user),
              C(via) (command, ansible or service), C(command), C(ansible_host), C(ansible_user), C(peer_pid).
          type: dict
          sample: {uid: 0, user: root, via: ansible, command: libcare.livepatch.livepatch,
                   ansible_host: 192.0.2.10, ansible_user: deploy, peer_pid: null}
unpatchable:
  description: Processes that cannot be patched, and why.
  returned: always
  type: list
  elements: dict
  contains:
    pid:
      description: Process id.
      type: int
      sample: 1
    comm:
      description: Command name.
      type: str
      sample: init
    reason:
      description: Why it cannot be patched.
      type: str
      sample: permission denied (ptrace)
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
        info_processes,
        select_pids,
    )
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.audit_index import applied_history
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.errors import CareError
except ImportError as exc:  # reported by main(), not at import time
    ENGINE_IMPORT_ERROR = EngineImportError(exc)
    CareError = Exception


def shape_info(process_infos, history=None):
    """Split the engine's report into patchable processes and unpatchable ones."""
    history = history or {}
    processes, unpatchable = [], []
    for info in process_infos:
        if info.unpatchable:
            unpatchable.append({"pid": info.pid, "comm": info.comm, "reason": info.unpatchable})
            continue
        processes.append({
            "pid": info.pid,
            "comm": info.comm,
            "objects": [
                {
                    "path": obj.path,
                    "build_id": obj.build_id,
                    "applied_level": obj.applied_level,
                    "available_level": obj.available_level,
                    "functions": list(obj.functions),
                    "applied_at": (history.get((info.pid, obj.build_id, obj.applied_level)) or {}).get("time"),
                    "applied_by": (history.get((info.pid, obj.build_id, obj.applied_level)) or {}).get(
                        "requested_by"),
                }
                for obj in info.objects
            ],
        })
    return processes, unpatchable


def run_module():
    module = AnsibleModule(
        argument_spec=dict(
            store=dict(type="path"),
            patch=dict(type="path"),
            pid=dict(type="int"),
            pids=dict(type="list", elements="int"),
            exe=dict(type="path"),
            name=dict(type="str"),
            audit_log=dict(type="path"),
        ),
        mutually_exclusive=[("store", "patch")],
        supports_check_mode=True,
    )
    fail_if_engine_missing(module, ENGINE_IMPORT_ERROR)

    params = module.params
    try:
        pids = select_pids(pid=params["pid"], pids=params["pids"], exe=params["exe"], name=params["name"])
        process_infos = info_processes(pids, params["store"] or params["patch"])
    except CareError as exc:
        module.fail_json(msg=str(exc), exception=traceback.format_exc())

    processes, unpatchable = shape_info(process_infos, applied_history(process_infos, params["audit_log"]))
    module.exit_json(changed=False, processes=processes, unpatchable=unpatchable)


def main():
    run_module()


if __name__ == "__main__":
    main()
