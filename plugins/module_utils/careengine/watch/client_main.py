"""What the launcher runs for ``libcare-ctl patch/unpatch/info`` while the service's socket
exists: ``python -I -S client_main.py ARGS`` (isolated: no site, no environment variables
for Python, neither the working directory nor this one on ``sys.path``).

A script is compiled on every start, a module only once: this file stays a few lines and
:mod:`.client` (cached bytecode) does the work.
"""

import sys

sys.path.insert(0, __file__.rpartition("/")[0] or ".")

import client  # noqa: E402 - this directory first

client.leave(client.main(sys.argv[1:]))
