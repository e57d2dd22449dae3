"""Trace-time argument checks shared by the public functions.

Every check raises ``ValueError`` naming the argument and what it got, so a wrong shape fails at
trace time with a message instead of broadcasting into silent garbage.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def shape_of(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def dtype_of(x, name: str = "argument"):
  try:
    return jnp.result_type(x)
  except TypeError:  # a string, None or other non-array: "data type '.1' not understood"
    raise ValueError(f"{name} must be an array or a number; got {type(x).__name__} {x!r}") from None


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
  if x is None:
    raise ValueError(f"{name} must be an array or a number; got None")
  dt = dtype_of(x, name)
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


_F32_MAX = float(np.finfo(np.float32).max)


def finite_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
  """A real Python/NumPy number that is finite (and > 0 or >= 0 when asked); returns it as float."""
  ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
        and abs(value) <= _F32_MAX)  # False for NaN too
  if ok and positive:
    ok = value > 0
  if ok and nonnegative:
    ok = value >= 0
  if not ok:
    want = "> 0 and" if positive else ">= 0 and" if nonnegative else "a real number,"
    raise ValueError(f"{name} must be {want} finite in float32; got {value!r}")
  return float(value)


def positive_finite_values(name: str, x) -> None:
  """When ``x`` is concrete (not traced under jit), checks that every entry is finite and > 0.

  Traced values cannot be inspected at trace time; those pass unchecked.
  """
  if isinstance(x, jax.core.Tracer):
    return
  v = np.asarray(x)
  if not np.issubdtype(v.dtype, np.number) or np.iscomplexobj(v):
    return  # the dtype checks report it
  bad = ~(np.isfinite(v) & (v > 0))
  if np.any(bad):
    if v.ndim == 0:
      raise ValueError(f"{name} must be finite and > 0; got {v.item()!r}")
    first = v.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]].item()
    raise ValueError(f"{name} must be finite and > 0 everywhere; got {int(np.sum(bad))} entries "
                     f"that are not, e.g. {first!r}")
