#!/usr/bin/python
# Copyright: libcare.livepatch contributors
# GNU General Public License v2.0 or later (GPL-2.0-or-later), hence also usable under v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: build live patches from a source tree and source patches."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: livepatch_build
short_description: Build live patches from a source tree and patches
version_added: 0.1.0
description:
  - Builds the project in O(src) twice (without and with O(patches)) through the libcare compiler
    wrapper, and stores one binary patch per changed object in the patch store O(dest), by build-id
    and level.
  - Idempotent by a digest of the patches, the make arguments and the source tree (build outputs
    excluded); the build runs again only when one of them changed or a stored patch is gone.
  - Runs on the builder host; the objects it builds (with their build-ids) are the ones the
    patches apply to, so deploy those binaries, not a separate build.
author:
  - libcare.livepatch maintainers (!UNKNOWN)
options:
  src:
    description:
      - The project's source directory; C(make) must build it (after C(./configure) if it has one).
      - It must be writable; the patches are applied to it during the build and reverted afterwards.
    type: path
    required: true
  patches:
    description:
      - Source patches (unified diffs applicable with C(patch -p1) in O(src)), in order.
    type: list
    elements: path
    required: true
  dest:
    description:
      - The patch store to put the built patches in (created when missing).
    type: path
    required: true
  make_args:
    description:
      - Extra arguments for C(make), for example V(PREFIX=/usr).
      - Unless one of them sets C(CC=), C(CC) is set to the engine's compiler wrapper (C(libcare-cc)),
        run with the module's interpreter; a project configured by C(configure) should be configured
        with C(CC) set to a C(libcare-cc) (or pass V(CC=...) here).
    type: list
    elements: str
    default: []
  jobs:
    description:
      - Parallel C(make) jobs (C(-j)); default one per CPU, as the engine decides.
    type: int
  clean:
    description:
      - Clean the tree before building (C(make clean)).
    type: bool
    default: false
  sign_key:
    description:
      - An OpenSSH private key (no passphrase) to sign the store's C(SHA256SUMS) with
        (C(ssh-keygen -Y sign), namespace C(libcare-livepatch)) into C(SHA256SUMS.sig), which
        M(libcare.livepatch.livepatch) checks with its O(libcare.livepatch.livepatch#module:allowed_signers).
      - The store always gets a C(SHA256SUMS) of its patches, signed or not.
      - A store left unsigned by an earlier run is signed even when nothing needs rebuilding (and a
        store without C(SHA256SUMS) gets one).
    type: path
requirements:
  - Linux x86_64, gcc, make and patch on the builder.
  - C(ssh-keygen) (openssh-client) on the builder when O(sign_key) is set.
  - Python 3.10 or later and pyelftools on the builder.
extends_documentation_fragment:
  - libcare.livepatch.livepatch.attributes_build
notes:
  - The digest and the list of files the build produced are kept in
    C(<dest>/.livepatch_build.<key>.json), one per source directory.
seealso:
  - module: libcare.livepatch.livepatch
"""

EXAMPLES = r"""
- name: Build the fix for the server
  libcare.livepatch.livepatch_build:
    src: /usr/src/myserver-1.2
    patches:
      - /usr/src/patches/CVE-2026-0001.patch
    dest: /var/lib/libcare-build/store
    make_args: [PREFIX=/usr]
    jobs: 2
  register: livepatch_build_result

- name: Show the build-ids the patches are for
  ansible.builtin.debug:
    msg: "{{ livepatch_build_result.patches | map(attribute='build_id') | list }}"
"""

RETURN = r"""
patches:
  description: The patches in the store, one per changed object (empty in check mode when a build would run).
  returned: always
  type: list
  elements: dict
  contains:
    build_id:
      description: Build-id of the object the patch applies to.
      type: str
      sample: 8e1f0a2c5b7d4e6f9a0b1c2d3e4f5a6b7c8d9e0f
    level:
      description: Patch level of the patch in the store.
      type: int
      sample: 1
    path:
      description: Path of the patch file in the store.
      type: str
      sample: /var/lib/libcare-build/store/8e1f0a2c5b7d4e6f9a0b1c2d3e4f5a6b7c8d9e0f/1/kpatch.bin
    object:
      description: The built object (executable or library) the patch is for.
      type: str
      sample: /usr/src/myserver-1.2/server
    functions:
      description: Functions the patch replaces.
      type: list
      elements: str
      sample: [handle_request]
    new_functions:
      description: Functions the patch adds.
      type: list
      elements: str
      sample: []
digest:
  description: The digest of patches, make arguments and sources that identifies this build.
  returned: always
  type: str
  sample: 0f4c2d9be1c1f1f6c3e5b1b0a8c8e9a7d3b2c1e0f9a8b7c6d5e4f3a2b1c0d9e8
"""

import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.libcare.livepatch.plugins.module_utils.engine_import import (  # noqa: E402
    EngineImportError,
    fail_if_engine_missing,
)

ENGINE_IMPORT_ERROR = None
try:
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.errors import CareError
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.integrity import sign_sums, write_sums
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.patchbuild import compiler
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.patchbuild.digest import (
        build_digest,
        built_patch_json,
        manifest_after_build,
        manifest_path,
        read_manifest,
        tree_files,
        write_manifest,
    )
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.patchbuild.project_build import (
        build_patches,
    )
except ImportError as exc:  # reported by main(), not at import time
    ENGINE_IMPORT_ERROR = EngineImportError(exc)
    CareError = Exception


def compiler_wrapper(directory):
    """Write a ``libcare-cc`` for this host into ``directory``; return its path.

    The engine's compiler wrapper must be an executable for make. On a managed host the
    engine only exists inside this module's payload, so the wrapper runs it from there,
    with this interpreter (which has the engine's dependencies).
    """
    package_file = os.path.abspath(compiler.__file__)
    marker = os.sep + os.path.join("ansible_collections", "libcare", "livepatch") + os.sep
    payload_root = package_file[: package_file.rindex(marker)]
    code = (f"import sys; sys.path.insert(0, {payload_root!r}); "
            "from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.patchbuild.compiler import main; "
            "raise SystemExit(main(sys.argv[1:]))")
    path = os.path.join(directory, "libcare-cc")
    with open(path, "w") as stream:
        stream.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"\n')
    os.chmod(path, 0o755)
    return path


def check_inputs(module, src, patches):
    """Fail (or, in check mode before the sources were copied, exit "would build")
    unless ``src`` is a directory and every patch a file."""
    missing = [path for path in [src] if not os.path.isdir(path)] + [p for p in patches if not os.path.isfile(p)]
    if module.check_mode and missing and patches:
        # A check before the sources were copied: a real run would build them.
        module.exit_json(changed=True, patches=[], digest=None,
                         msg=f"would build: {', '.join(missing)} not there yet")
    if not os.path.isdir(src):
        module.fail_json(msg=f"src {src} is not a directory")
    for patch in patches:
        if not os.path.isfile(patch):
            module.fail_json(msg=f"patch {patch} does not exist")
    if not patches:
        module.fail_json(msg="patches must name at least one patch file")


def complete_integrity(module, dest, sign_key):
    """A store built before it carried SHA256SUMS gets one, and a store left unsigned is signed
    with ``sign_key``, without rebuilding; whether anything was (or would be) written."""
    changed = False
    try:
        if not os.path.exists(os.path.join(dest, "SHA256SUMS")):
            changed = True
            if not module.check_mode:
                write_sums(dest)
        if sign_key and not os.path.exists(os.path.join(dest, "SHA256SUMS.sig")):
            changed = True
            if not module.check_mode:
                sign_sums(dest, sign_key)
    except (CareError, OSError) as exc:
        module.fail_json(msg=str(exc))
    return changed


def run_module():
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path", required=True),
            patches=dict(type="list", elements="path", required=True),
            dest=dict(type="path", required=True),
            make_args=dict(type="list", elements="str", default=[]),
            jobs=dict(type="int"),
            clean=dict(type="bool", default=False),
            sign_key=dict(type="path", no_log=False),
        ),
        supports_check_mode=True,
    )
    fail_if_engine_missing(module, ENGINE_IMPORT_ERROR)

    params = module.params
    src, dest, patches, make_args = params["src"], params["dest"], params["patches"], params["make_args"]
    check_inputs(module, src, patches)

    store_dir = os.path.realpath(dest)
    manifest_file = manifest_path(dest, src)
    manifest = read_manifest(manifest_file)
    before = tree_files(src, manifest.outputs, store_dir)
    digest = build_digest(before, patches, make_args)
    if manifest.is_current(digest):
        completed = complete_integrity(module, dest, params["sign_key"])
        module.exit_json(changed=completed, patches=list(manifest.patches), digest=digest)
    if module.check_mode:
        module.exit_json(changed=True, patches=[], digest=digest)

    build_args = list(make_args)
    if not any(argument.startswith("CC=") for argument in build_args):
        build_args.append("CC=" + compiler_wrapper(module.tmpdir))
    try:
        os.makedirs(dest, exist_ok=True)
        result = build_patches(src, patches, dest=dest, make_args=build_args,
                               jobs=params["jobs"], clean=params["clean"], sign_key=params["sign_key"])
    except CareError as exc:
        module.fail_json(msg=str(exc), exception=traceback.format_exc())

    after = tree_files(src, manifest.outputs, store_dir)
    built = [built_patch_json(patch) for patch in result.patches]
    if not built:
        module.warn("the build produced no patch: do the patches change any function, and does the "
                    "project compile with CC set to libcare-cc?")
    manifest = manifest_after_build(src, patches, make_args, before, after, manifest, built)
    write_manifest(manifest_file, manifest)
    module.exit_json(changed=True, patches=built, digest=manifest.digest)


def main():
    run_module()


if __name__ == "__main__":
    main()
