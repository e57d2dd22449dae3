"""Trace-time argument checks shared by the public functions.

Every check raises ``ValueError`` naming the argument and what it got, so a wrong shape fails at
trace time with a message instead of broadcasting into silent garbage.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def shape_of(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def dtype_of(x):
  return jnp.result_type(x)


def rank(name: str, x, ranks: int | Sequence[int], what: str = "") -> int:
  """Checks that `x` has one of `ranks` dimensions and returns its rank."""
  ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
  r = len(shape_of(x))
  if r not in ranks:
    want = " or ".join(str(k) for k in ranks)
    hint = f" {what}" if what else ""
    raise ValueError(f"{name} must have rank {want}{hint}; got shape {shape_of(x)}")
  return r


def shape(name: str, x, expected: Sequence[int | None], what: str = "") -> None:
  """Checks `x`'s shape against `expected`; None matches any size."""
  got = shape_of(x)
  ok = len(got) == len(expected) and all(e is None or g == e for g, e in zip(got, expected))
  if not ok:
    want = "(" + ", ".join("?" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
    hint = f" {what}" if what else ""
    raise ValueError(f"{name} must have shape {want}{hint}; got {got}")


def floating(name: str, x, allow_complex: bool = False) -> None:
  dt = dtype_of(x)
  ok = jnp.issubdtype(dt, jnp.floating) or (allow_complex and jnp.issubdtype(dt, jnp.complexfloating))
  if not ok:
    kind = "a floating or complex" if allow_complex else "a floating-point"
    raise ValueError(f"{name} must have {kind} dtype; got {dt}")


def positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer; got {value!r}")
  return int(value)


def one_of(name: str, value, choices: Sequence) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
