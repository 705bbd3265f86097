"""A trainer's clean stop on SIGTERM or SIGINT: finish the step, checkpoint, exit non-zero.

    with stop_signals.StopRequests() as stop:
      for step in ...:
        ...one step...
        if stop.requested:
          ...save a checkpoint...
          raise stop_signals.Interrupted(stop.requested, step)

The first SIGTERM or SIGINT only records the request (the loop stops after the step it is in);
a second one raises `Interrupted` at once, from wherever the program is (the last checkpoint
is kept: orbax writes each one to a temporary directory and renames it when complete).
`python -m experiments.train` exits with `128 + signal number` (143 for SIGTERM, 130 for
SIGINT), what a shell reports for a process the signal ended, which `experiments.sweep` records
as 'interrupted'.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
  """The exit status of a trainer stopped by `signum`."""
  return 128 + int(signum)


class Interrupted(Exception):
  """Training stopped on a signal (after saving a checkpoint, unless `step` is None).

  Attributes:
    signum: the signal.
    step: the step of the checkpoint saved on the way out, or None.
    exit_code: `128 + signum`.
  """

  def __init__(self, signum: int, step: int | None, where: str = ''):
    self.signum, self.step = int(signum), step
    self.exit_code = exit_code(signum)
    saved = f'; checkpoint of step {step} saved{" in " + where if where else ""}' if (
        step is not None) else ''
    super().__init__(f'Stopped by {signal.Signals(signum).name}{saved}. Rerun the same '
                     'command to resume.')


class StopRequests:
  """Records SIGTERM / SIGINT while active (a context manager; the previous handlers come back
  on exit). Outside the main thread no handler can be installed, and nothing is recorded."""

  def __init__(self):
    self.requested: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested is not None:
      raise Interrupted(signum, None)
    self.requested = signum

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, signal.SIG_DFL if previous is None else previous)
    self._previous = {}
