"""Seeds for the tests' random inputs: fixed by default, so a CI failure replays as it was.

Each test draws its seeds from its own id, the order of the draw and one base seed. The base is 0
unless ``SSMAX_TEST_SEED`` says otherwise: an integer picks that base, ``random`` a fresh one per
session. The base in use is printed in the header and with every failure, so
``SSMAX_TEST_SEED=<base> pytest <test id>`` replays a failing test with its inputs.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

ENV = "SSMAX_TEST_SEED"


def _session_base() -> int:
  value = os.environ.get(ENV, "").strip()
  if value == "random":
    return int(np.random.SeedSequence().entropy % (2**31))
  try:
    return int(value) if value else 0
  except ValueError:
    raise ValueError(f"{ENV} must be an integer or 'random'; got {value!r}") from None


BASE = _session_base()
_test = {"id": "", "draws": 0}


def start_test(test_id: str) -> None:
  _test.update(id=test_id, draws=0)


def draw() -> int:
  """The next seed of the running test: a function of its id, the draw's order and the base."""
  key = f"{BASE}:{_test['id']}:{_test['draws']}"
  _test["draws"] += 1
  return zlib.crc32(key.encode()) % (2**31)
