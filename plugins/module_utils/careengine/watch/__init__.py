"""``libcare-ctl watch``: the resident service that keeps every process patched.

Kept free of imports on purpose: :mod:`.client` (``_socket`` and ``posix`` only) is imported
by the command line on every call and must not pull the engine in.

Modules, each with one job:

- :mod:`.fanotify`   fanotify through ctypes: permission events on the patched objects;
- :mod:`.elfscan`    the few ELF facts the service needs from a file (build-id, interpreter,
                     RELRO), read with ``struct`` from the first page;
- :mod:`.discovery`  which files on the host are objects the store has a patch for;
- :mod:`.wanted`     the wanted state the store records (``latest`` minus unpatched build-ids);
- :mod:`.catch`      one caught process, from its exec (or library open) to the moment it
                     may be patched: a state machine over ptrace syscall stops;
- :mod:`.held`       patching a process the service already holds under ptrace;
- :mod:`.status`     counters and per-process records (when, how, by whom);
- :mod:`.protocol`   the socket's request and answer format;
- :mod:`.server`     the Unix socket: peer credentials, authorisation, requests;
- :mod:`.service`    the event loop tying them together;
- :mod:`.client`     the command line's side of the socket;
- :mod:`.client_main` what the launcher runs (``python -I -S``) while the socket exists;
- :mod:`.command`    ``libcare-ctl watch`` argument parsing.
"""
