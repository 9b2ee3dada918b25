"""Child processes die with the process that started them, however it dies (SIGKILL included).

Two cases:

- a child we start ourselves (`lum run` starting `lum embed`): `die_with_parent` as its `preexec_fn` asks the
  kernel to send it SIGTERM when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`);
- processes a library starts for us (vLLM's engine core and workers, which hold the model and its KV cache):
  `watch_descendants()` starts a small watchdog process that keeps a list of this process's descendants and, once
  this process is gone, kills the ones still alive. A killed process runs no code of its own, so the watchdog
  has to be another process; it is in its own session, so a Ctrl-C to the terminal reaches only the job itself.

    subprocess.run(command, preexec_fn=die_with_parent)
    watch_descendants()       # before starting an engine that spawns processes
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1

# The watchdog: polls its target every 0.2 s, remembering the target's descendants; when the target is gone (or
# a zombie), kills what it remembered. psutil is a dependency of vLLM and Ray; without it the watchdog does nothing.
_WATCHDOG = """
import os, sys, time
try:
    import psutil
except ImportError:
    sys.exit(0)
target = int(sys.argv[1])
try:
    parent = psutil.Process(target)
except psutil.NoSuchProcess:
    sys.exit(0)
known = {}
while True:
    try:
        if parent.status() == psutil.STATUS_ZOMBIE:
            break
        for child in parent.children(recursive=True):
            if child.pid != os.getpid():  # the watchdog is a child too
                known[child.pid] = child
    except psutil.NoSuchProcess:
        break
    time.sleep(0.2)
for child in known.values():
    try:
        child.kill()
    except psutil.NoSuchProcess:
        pass
"""


def die_with_parent() -> None:
    """`preexec_fn` for subprocess on Linux: the child gets SIGTERM when the thread that started it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def watch_descendants() -> subprocess.Popen:
    """Start the watchdog over this process's descendants (see the module docstring); returns its process."""
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
