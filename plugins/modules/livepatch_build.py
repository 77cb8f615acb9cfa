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
requirements:
  - Linux x86_64, gcc, make and patch on the builder.
  - pyelftools on the builder.
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

import hashlib  # noqa: E402
import json  # noqa: E402
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
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.patchbuild import compiler
    from ansible_collections.libcare.livepatch.plugins.module_utils.careengine.patchbuild.api import build_patches
except ImportError as exc:  # reported by main(), not at import time
    ENGINE_IMPORT_ERROR = EngineImportError(exc)
    CareError = Exception

# Directories that only ever hold build state, never sources.
SKIPPED_DIRS = frozenset((".git", ".hg", ".svn", "lpmake", "patchroot", ".lpmaketmp", "__pycache__"))
# Build products recognisable by name; ELF files are recognised by their magic as well.
SKIPPED_SUFFIXES = (".o", ".a", ".so", ".lo", ".la", ".pyc")
ELF_MAGIC = b"\x7fELF"
MANIFEST_PREFIX = ".livepatch_build."


def file_digest(path):
    """sha256 of a file's content (of the link text for a symlink), or None for an ELF file."""
    if os.path.islink(path):
        return hashlib.sha256(os.readlink(path).encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        head = stream.read(65536)
        if head.startswith(ELF_MAGIC):
            return None
        while head:
            digest.update(head)
            head = stream.read(65536)
    return digest.hexdigest()


def tree_files(src, excluded, skip_dir=None):
    """``{relative path: content digest}`` of the source files under ``src``.

    Skips build-state directories, ``skip_dir`` (the store when it lies inside ``src``),
    object files, ELF files and the paths in ``excluded`` (what an earlier build produced).
    """
    files = {}
    for top, dirs, names in os.walk(src):
        dirs[:] = sorted(
            d for d in dirs
            if d not in SKIPPED_DIRS and os.path.realpath(os.path.join(top, d)) != skip_dir
        )
        for name in names:
            if name.endswith(SKIPPED_SUFFIXES) or ".so." in name:
                continue
            path = os.path.join(top, name)
            relative = os.path.relpath(path, src)
            if relative in excluded or not (os.path.isfile(path) or os.path.islink(path)):
                continue
            content = file_digest(path)
            if content is not None:
                files[relative] = content
    return files


def build_digest(files, patches, make_args):
    """One digest over the source files, the patches (in order) and the make arguments."""
    digest = hashlib.sha256()
    for patch in patches:
        digest.update(b"patch\0" + file_digest(patch).encode() + b"\0")
    for argument in make_args:
        digest.update(b"make_arg\0" + argument.encode() + b"\0")
    for relative in sorted(files):
        digest.update(b"file\0" + relative.encode() + b"\0" + files[relative].encode() + b"\0")
    return digest.hexdigest()


def manifest_path(dest, src):
    """Where the digest of the last build of ``src`` into ``dest`` is kept."""
    key = hashlib.sha256(os.path.realpath(src).encode()).hexdigest()[:16]
    return os.path.join(dest, MANIFEST_PREFIX + key + ".json")


def read_manifest(path):
    """The manifest of the last successful build, or an empty one."""
    try:
        with open(path) as stream:
            manifest = json.load(stream)
    except (OSError, ValueError):
        return {"digest": None, "outputs": [], "patches": []}
    manifest.setdefault("outputs", [])
    manifest.setdefault("patches", [])
    return manifest


def write_manifest(path, manifest):
    temporary = path + ".tmp"
    with open(temporary, "w") as stream:
        json.dump(manifest, stream, indent=1, sort_keys=True)
    os.replace(temporary, path)


def built_patch_json(patch):
    stored_path = getattr(patch, "stored_path", None)
    return {
        "build_id": patch.build_id,
        "path": stored_path or patch.path,
        "level": getattr(patch, "level", None),
        "object": patch.object,
        "functions": list(patch.functions),
        "new_functions": list(patch.new_functions),
    }


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


def run_module():
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path", required=True),
            patches=dict(type="list", elements="path", required=True),
            dest=dict(type="path", required=True),
            make_args=dict(type="list", elements="str", default=[]),
            jobs=dict(type="int"),
            clean=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    fail_if_engine_missing(module, ENGINE_IMPORT_ERROR)

    params = module.params
    src, dest, patches, make_args = params["src"], params["dest"], params["patches"], params["make_args"]
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

    store_dir = os.path.realpath(dest)
    manifest_file = manifest_path(dest, src)
    manifest = read_manifest(manifest_file)
    previous_outputs = set(manifest["outputs"])
    before = tree_files(src, previous_outputs, store_dir)
    digest = build_digest(before, patches, make_args)
    up_to_date = (
        manifest.get("digest") == digest
        and manifest["patches"]
        and all(os.path.isfile(p["path"]) for p in manifest["patches"])
    )
    if up_to_date:
        module.exit_json(changed=False, patches=manifest["patches"], digest=digest)
    if module.check_mode:
        module.exit_json(changed=True, patches=[], digest=digest)

    build_args = list(make_args)
    if not any(argument.startswith("CC=") for argument in build_args):
        build_args.append("CC=" + compiler_wrapper(module.tmpdir))
    try:
        os.makedirs(dest, exist_ok=True)
        result = build_patches(src, patches, dest=dest, make_args=build_args,
                               jobs=params["jobs"], clean=params["clean"])
    except CareError as exc:
        module.fail_json(msg=str(exc), exception=traceback.format_exc())

    after = tree_files(src, previous_outputs, store_dir)
    produced = {path for path, content in after.items() if before.get(path) != content}
    outputs = sorted(produced | previous_outputs)
    sources = {path: content for path, content in after.items() if path not in produced}
    built = [built_patch_json(patch) for patch in result.patches]
    if not built:
        module.warn("the build produced no patch: do the patches change any function, and does the "
                    "project compile with CC set to libcare-cc?")
    manifest = {
        "src": os.path.realpath(src),
        "digest": build_digest(sources, patches, make_args),
        "outputs": outputs,
        "patches": built,
    }
    write_manifest(manifest_file, manifest)
    module.exit_json(changed=True, patches=built, digest=manifest["digest"])


def main():
    run_module()


if __name__ == "__main__":
    main()
