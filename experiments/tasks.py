"""Synthetic tasks of the Mamba paper (Gu & Dao, 2023, section 3.1 and appendix E.1), in pure JAX.

Every task is a frozen dataclass with a ``sample(key, batch_size)`` method that returns a
:class:`Batch` of next-token-style supervision: ``inputs`` and ``targets`` of shape
``(batch, length)`` and a ``mask`` saying at which positions the loss and the accuracy count. The
same model and training loop therefore serve every task: the model reads ``inputs`` causally and is
scored on ``targets`` where ``mask`` is set. ``sample`` is jit-able (the task is static) and depends
only on the key, so smaller presets are the same task with smaller numbers.

Token conventions follow the S4 repository's copying generator, from which the paper's Selective
Copying task comes: token 0 is the noise (blank) token, ``vocab_size - 1`` the marker that asks for
the next memorised token, and the data tokens are ``1 .. vocab_size - 2``.

:class:`PackedInductionHeads` packs examples of mixed lengths into each row (a
:class:`PackedBatch` with ``segment_ids``), the variable-length form of Induction Heads that
``--pack`` trains on.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ssmax import _checks
from ssmax.scan import segment_ids_from_lengths


class Batch(NamedTuple):
  """One batch of a task; every field is ``(batch, length)``."""

  inputs: jax.Array  # int32 tokens the model reads
  targets: jax.Array  # int32 token to predict at each position (0 where the mask is off)
  mask: jax.Array  # float32, 1.0 where the loss and the accuracy count


@dataclasses.dataclass(frozen=True)
class Copying:
  """Copying and, with ``selective=True``, Selective Copying (paper figure 2, appendix E.1).

  A sequence of ``length`` tokens: ``num_tokens`` data tokens drawn uniformly from
  ``1 .. vocab_size - 2`` are placed among noise tokens (0) in the first ``length - num_tokens``
  positions, then ``num_tokens`` markers (``vocab_size - 1``) follow. At the i-th marker the model
  must output the i-th data token. In plain Copying the data tokens sit at the first positions (a
  fixed lag, solvable by a time-invariant model); in Selective Copying they sit at random sorted
  positions, so recalling them needs content-aware reasoning.

  The paper's setting is ``length=4096, num_tokens=16, vocab_size=16`` (16 tokens including the
  noise token and the marker, so 14 data values; ``length`` counts the markers).
  """

  length: int = 4096
  num_tokens: int = 16
  vocab_size: int = 16
  selective: bool = False

  def __post_init__(self):
    _checks.positive_int("length", self.length)
    _checks.positive_int("num_tokens", self.num_tokens)
    _checks.positive_int("vocab_size", self.vocab_size)
    if self.vocab_size < 3:
      raise ValueError(f"vocab_size must be >= 3 (noise, marker and a data token); got {self.vocab_size}")
    if self.length < 2 * self.num_tokens:
      raise ValueError(f"length must be >= 2 * num_tokens = {2 * self.num_tokens} to hold the data tokens "
                       f"and the markers; got {self.length}")

  @property
  def noise_token(self) -> int:
    return 0

  @property
  def marker_token(self) -> int:
    return self.vocab_size - 1

  @property
  def chance_accuracy(self) -> float:
    return 1.0 / (self.vocab_size - 2)

  def sample(self, key: jax.Array, batch_size: int) -> Batch:
    """Draws ``batch_size`` sequences; ``Batch`` fields are ``(batch_size, length)``."""
    _checks.positive_int("batch_size", batch_size)
    b, m = batch_size, self.num_tokens
    region = self.length - m
    k_tok, k_pos = jax.random.split(key)
    tokens = jax.random.randint(k_tok, (b, m), 1, self.vocab_size - 1, dtype=jnp.int32)
    if self.selective:
      # m distinct positions, uniform over the region, kept in increasing order.
      _, pos = lax.top_k(jax.random.uniform(k_pos, (b, region)), m)
      pos = jnp.sort(pos, axis=-1)
    else:
      pos = jnp.broadcast_to(jnp.arange(m), (b, m))
    rows = jnp.arange(b)[:, None]
    body = jnp.zeros((b, region), jnp.int32).at[rows, pos].set(tokens)
    markers = jnp.full((b, m), self.marker_token, jnp.int32)
    inputs = jnp.concatenate([body, markers], axis=1)
    targets = jnp.concatenate([jnp.zeros((b, region), jnp.int32), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((b, region)), jnp.ones((b, m))], axis=1).astype(jnp.float32)
    return Batch(inputs, targets, mask)


@dataclasses.dataclass(frozen=True)
class SelectiveCopying(Copying):
  """:class:`Copying` with the data tokens at random positions (the paper's Selective Copying)."""

  selective: bool = True


@dataclasses.dataclass(frozen=True)
class InductionHeads:
  """Induction Heads (paper section 4.1.2, appendix E.1): recall the token after a special token.

  A sequence of ``length`` tokens drawn uniformly from ``0 .. vocab_size - 2``; the special token
  (``vocab_size - 1``) is written at one position ``p`` uniform in ``[0, length - 3]`` and again at
  the last position. At the last position the model must output the token that followed the first
  special token (the token at ``p + 1``). The paper trains at ``length=256`` with ``vocab_size=16``
  and tests at every power of two from 2^6 to 2^20.
  """

  length: int = 256
  vocab_size: int = 16

  def __post_init__(self):
    _checks.positive_int("length", self.length)
    _checks.positive_int("vocab_size", self.vocab_size)
    if self.length < 3:
      raise ValueError(f"length must be >= 3 (special, answer, special); got {self.length}")
    if self.vocab_size < 2:
      raise ValueError(f"vocab_size must be >= 2 (a content token and the special token); got {self.vocab_size}")

  @property
  def special_token(self) -> int:
    return self.vocab_size - 1

  @property
  def chance_accuracy(self) -> float:
    return 1.0 / (self.vocab_size - 1)

  def with_length(self, length: int) -> "InductionHeads":
    return dataclasses.replace(self, length=length)

  def sample(self, key: jax.Array, batch_size: int) -> Batch:
    """Draws ``batch_size`` sequences; ``Batch`` fields are ``(batch_size, length)``."""
    _checks.positive_int("batch_size", batch_size)
    b, l = batch_size, self.length
    k_tok, k_pos = jax.random.split(key)
    inputs = jax.random.randint(k_tok, (b, l), 0, self.vocab_size - 1, dtype=jnp.int32)
    pos = jax.random.randint(k_pos, (b,), 0, l - 2)
    rows = jnp.arange(b)
    inputs = inputs.at[rows, pos].set(self.special_token).at[:, l - 1].set(self.special_token)
    answer = inputs[rows, pos + 1]
    targets = jnp.zeros((b, l), jnp.int32).at[:, l - 1].set(answer)
    mask = jnp.zeros((b, l), jnp.float32).at[:, l - 1].set(1.0)
    return Batch(inputs, targets, mask)


class PackedBatch(NamedTuple):
  """A :class:`Batch` of packed documents: every field ``(batch, length)``; ``segment_ids``
  (int32) numbers the documents of each row (a new one starts where it changes), for the model's
  ``segment_ids`` argument."""

  inputs: jax.Array
  targets: jax.Array
  mask: jax.Array
  segment_ids: jax.Array


@dataclasses.dataclass(frozen=True)
class PackedInductionHeads:
  """:class:`InductionHeads` examples of mixed lengths packed into rows of ``length`` tokens.

  Each row holds ``documents`` examples back to back, of random lengths ``>= min_length`` adding
  up to ``length`` (each example: special token at a random position, again at its last
  position, the answer scored there), told apart by ``segment_ids``. A model reading them with
  ``segment_ids`` sees each example as if alone: the variable-length version of the task, with no
  padding. Evaluation uses :attr:`unpacked`, the task at full ``length``.
  """

  length: int = 256
  vocab_size: int = 16
  documents: int = 4
  min_length: int = 8

  def __post_init__(self):
    for name in ("length", "vocab_size", "documents", "min_length"):
      _checks.positive_int(name, getattr(self, name))
    if self.min_length < 3:
      raise ValueError(f"min_length must be >= 3 (special, answer, special); got {self.min_length}")
    if self.vocab_size < 2:
      raise ValueError(f"vocab_size must be >= 2; got {self.vocab_size}")
    if self.documents * self.min_length > self.length:
      raise ValueError(f"documents * min_length must be <= length={self.length}; got "
                       f"{self.documents} * {self.min_length}")

  @property
  def unpacked(self) -> InductionHeads:
    return InductionHeads(length=self.length, vocab_size=self.vocab_size)

  @property
  def special_token(self) -> int:
    return self.vocab_size - 1

  @property
  def chance_accuracy(self) -> float:
    return 1.0 / (self.vocab_size - 1)

  def with_length(self, length: int) -> InductionHeads:
    """The unpacked task at ``length`` (testing is on whole rows, one example each)."""
    return self.unpacked.with_length(length)

  def sample(self, key: jax.Array, batch_size: int) -> PackedBatch:
    """Draws ``batch_size`` rows of ``documents`` examples each; fields ``(batch_size, length)``."""
    _checks.positive_int("batch_size", batch_size)
    b, l, n = batch_size, self.length, self.documents
    k_len, k_tok, k_pos = jax.random.split(key, 3)
    # Lengths: min_length each, the rest split at n - 1 uniform cut points.
    spare = l - n * self.min_length
    cuts = jnp.sort(jax.random.randint(k_len, (b, n - 1), 0, spare + 1), axis=-1)
    edges = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), cuts,
                             jnp.full((b, 1), spare, jnp.int32)], axis=-1)
    lengths = jnp.diff(edges, axis=-1) + self.min_length  # (b, n), sums to l
    ends = jnp.cumsum(lengths, axis=-1)
    starts = ends - lengths
    segment_ids = segment_ids_from_lengths(lengths, l)
    inputs = jax.random.randint(k_tok, (b, l), 0, self.vocab_size - 1, dtype=jnp.int32)
    # The first special token of each example at a uniform position in [start, end - 3].
    pos = starts + jnp.floor(jax.random.uniform(k_pos, (b, n)) * (lengths - 2)).astype(jnp.int32)
    rows = jnp.arange(b)[:, None]
    inputs = inputs.at[rows, pos].set(self.special_token).at[rows, ends - 1].set(self.special_token)
    answer = inputs[rows, pos + 1]
    targets = jnp.zeros((b, l), jnp.int32).at[rows, ends - 1].set(answer)
    mask = jnp.zeros((b, l), jnp.float32).at[rows, ends - 1].set(1.0)
    return PackedBatch(inputs, targets, mask, segment_ids)


TASKS = {"copying": Copying, "selective_copying": SelectiveCopying, "induction_heads": InductionHeads}
