"""Helpers shared by the benchmarks: XLA's cost and memory figures, and wall time."""

from __future__ import annotations

import sys
import time

import jax
import numpy as np


def _cost(compiled) -> dict:
  """`cost_analysis()` as one dict (older JAX returns a list of one)."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def compiled_cost(compiled) -> tuple[float, dict[str, int]]:
  """XLA's FLOP count and memory sizes (bytes) of a compiled function."""
  mem = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'alias_size_in_bytes')
  return float(_cost(compiled).get('flops', 0.0)), {f: int(getattr(mem, f, 0) or 0)
                                                    for f in fields}


def bytes_accessed(compiled) -> float:
  """XLA's count of the bytes a compiled function reads and writes (`cost_analysis()`'s
  'bytes accessed'): what a layout that copies activations around costs, on any machine."""
  return float(_cost(compiled).get('bytes accessed', 0.0))


def median_time(fn, args, repeats):
  """Median wall time of `fn(*args)` over `repeats` calls, after one warm-up call."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def total_bytes(r: dict[str, int]) -> int:
  """Arguments + outputs + temporaries - aliased (donated) bytes of a compiled step."""
  return (r['argument_size_in_bytes'] + r['output_size_in_bytes'] + r['temp_size_in_bytes']
          - r['alias_size_in_bytes'])


def finish(header: str, report: str, failed: list[str]) -> None:
  """Prints a benchmark's header, table and failed claims; exits non-zero if any failed."""
  print(header)
  print(report)
  for f in failed:
    print('FAILED:', f)
  sys.exit(1 if failed else 0)
