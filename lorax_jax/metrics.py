"""Metric logging without TensorFlow: JSON lines, TensorBoard event files, a console progress line.

`MetricWriter(workdir)` appends `{"step": s, name: value, ...}` lines to `metrics.jsonl` and scalar
summaries to `events.out.tfevents.*`, the TFRecord-framed `Event` protocol buffers TensorBoard
reads (encoded here by hand: a handful of fields, so no protobuf or TensorFlow dependency).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int | None = None, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """An `Event` proto: wall_time (1), step (2), file_version (3), summary (5) of simple values."""
  out = _field(1, 1, struct.pack('<d', wall_time))
  if step is not None:
    out += _field(2, 0, _varint(step & 0xFFFFFFFFFFFFFFFF))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b''.join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack('<f', value)))
        for tag, value in scalars.items())
    out += _bytes_field(5, values)
  return out


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', _masked_crc(length)) + data +
          struct.pack('<I', _masked_crc(data)))


def read_tfrecords_bytes(buffer: bytes, name: str = '<bytes>') -> list[bytes]:
  """Splits and checks TFRecord framing; ValueError on a corrupt record."""
  records, pos = [], 0
  while pos < len(buffer):
    header = buffer[pos:pos + 12]
    length, crc = struct.unpack('<QI', header)
    if crc != _masked_crc(header[:8]):
      raise ValueError(f'{name}: corrupt record length at byte {pos}.')
    data = buffer[pos + 12:pos + 12 + length]
    (dcrc,) = struct.unpack('<I', buffer[pos + 12 + length:pos + 16 + length])
    if dcrc != _masked_crc(data):
      raise ValueError(f'{name}: corrupt record data at byte {pos}.')
    records.append(data)
    pos += 16 + length
  return records


def read_tfrecords(path: str) -> list[bytes]:
  """Reads and checks every record of a TFRecord file (used by the tests)."""
  with open(path, 'rb') as f:
    return read_tfrecords_bytes(f.read(), path)


class MetricWriter:
  """Writes scalar metrics to `workdir/metrics.jsonl` and a TensorBoard event file.

  Args:
    workdir: the run's directory.
    enabled: False on all but one process of a multi-process run.
    resume_step: when resuming from a checkpoint at this step, JSON lines of later steps (written
      before the interruption, and about to be written again) are dropped, as is a last line cut
      short by a kill.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    self._kept: set[tuple[int, str]] = set()
    if os.path.exists(path):
      kept = []
      with open(path, encoding='utf-8') as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue
          if resume_step is None or record.get('step', 0) <= resume_step:
            kept.append(json.dumps(record) + '\n')
            self._kept.update((record.get('step', 0), k) for k in record if k != 'step')
      with open(path, 'w', encoding='utf-8') as f:
        f.writelines(kept)
    self._jsonl = open(path, 'a', encoding='utf-8')
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self._events = open(os.path.join(workdir, name), 'ab')
    self._events.write(tfrecord(encode_event(time.time(), file_version='brain.Event:2')))

  def has(self, step: int, name: str) -> bool:
    """Whether the kept JSON lines (those before a resume) have metric `name` at `step`."""
    return self.enabled and (step, name) in self._kept

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    self._events.write(tfrecord(encode_event(time.time(), int(step), scalars=scalars)))
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()


class Progress:
  """A one-line console progress display: step, loss, steps/s and ETA."""

  def __init__(self, total: int, start: int = 0, stream=None, enabled: bool = True):
    self.total, self.start, self.enabled = total, start, enabled
    self.stream = stream or sys.stderr
    self.t0 = time.time()
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()

  def update(self, step: int, **values: float) -> None:
    if not self.enabled:
      return
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float('inf')
    width = 24
    filled = int(width * step / max(self.total, 1))
    extra = ' '.join(f'{k} {v:.4f}' for k, v in values.items())
    line = (f'[{"#" * filled}{"." * (width - filled)}] {step}/{self.total} {extra} '
            f'{rate:.1f} steps/s ETA {eta:.0f}s')
    self.stream.write(('\r' + line) if self.tty else (line + '\n'))
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write('\n')
      self.stream.flush()
