"""One trainer per workdir: an exclusive `fcntl.flock` on `WORKDIR/trainer.lock`.

    with workdir_lock.hold(workdir):      # raises WorkdirLocked if another process holds it
      ...train...

The lock file holds the holder's pid (for the error message and for tools). The kernel releases
a `flock` when the process that holds it exits however it exits (SIGKILL included), so a killed
trainer never leaves a stale lock behind; the file itself stays (removing it would let a second
process lock a fresh file while a third still holds the old one). The descriptor is not
inherited by the processes the trainer starts.

Locks are advisory and per open file: a process that opens the file without `flock` is not
stopped. On network file systems `flock` is as good as the server's lock support (Linux NFS
maps it to byte-range locks, which the server arbitrates).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from typing import Iterator

LOCK_NAME = 'trainer.lock'
EXIT_CODE = 2   # what `python -m experiments.train` exits with when the workdir is locked


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir's lock.

  Attributes:
    path: the lock file.
    pid: the holder's pid (None if it could not be read).
    exit_code: the trainer's exit status for this error (`EXIT_CODE`).
  """
  exit_code = EXIT_CODE

  def __init__(self, path: str, pid: int | None):
    self.path, self.pid = path, pid
    holder = f'process {pid}' if pid is not None else 'another process (pid not recorded)'
    super().__init__(f'The workdir {os.path.dirname(path)} is in use by {holder}, which holds '
                     f'{path}; stop it or use another workdir.')


def holder(workdir: str) -> int | None:
  """The pid written in `workdir`'s lock file, or None (no file, or empty). The pid of a
  process that has exited stays written until the next holder writes its own: whether the
  lock is held now, only `hold` tells."""
  try:
    with open(os.path.join(workdir, LOCK_NAME)) as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None


@contextlib.contextmanager
def hold(workdir: str, wait_for_pid: float = 2.0) -> Iterator[str]:
  """Holds `WORKDIR/trainer.lock` (creating the directory) for the body; yields its path.

  Args:
    workdir: the run's directory.
    wait_for_pid: seconds to wait, when the lock is taken, for its holder to have written its
      pid (it locks first, then writes), before naming no pid.

  Raises:
    WorkdirLocked: if another process holds the lock (the message names its pid).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      deadline = time.monotonic() + wait_for_pid
      pid = holder(workdir)
      while pid is None and time.monotonic() < deadline:
        time.sleep(0.05)
        pid = holder(workdir)
      raise WorkdirLocked(path, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    os.fsync(fd)
    yield path
  finally:
    os.close(fd)   # releases the lock (if held); the kernel does the same on any exit
