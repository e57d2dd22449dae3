"""Fixtures shared by the tests: fresh random inputs on every run, reproducible from the seed."""

import numpy as np
import pytest


def fresh_seed() -> int:
  """A new seed each call, printed so a failing test can be rerun with the same inputs."""
  seed = int(np.random.SeedSequence().entropy % (2**31))
  print(f"seed={seed}")
  return seed


@pytest.fixture
def seed() -> int:
  return fresh_seed()


@pytest.fixture
def rng(seed) -> np.random.Generator:
  return np.random.default_rng(seed)
