"""Shared fixtures and markers.

Random inputs come from :mod:`seeds` (fixed by default; ``SSMAX_TEST_SEED=random`` draws fresh
ones and every failure prints the base seed that replays it). Tests marked ``gpu`` need a GPU and
are deselected by default; run them on the device with ``pytest -m gpu``.
"""

import numpy as np
import pytest

import seeds


def pytest_report_header(config):
  return f"test seeds: base {seeds.BASE} (set {seeds.ENV}=<int> or 'random' to change)"


@pytest.fixture(autouse=True)
def _seed_per_test(request):
  seeds.start_test(request.node.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if report.failed:
    report.sections.append(("seed", f"replay with {seeds.ENV}={seeds.BASE} pytest '{item.nodeid}'"))


@pytest.fixture
def seed() -> int:
  return seeds.draw()


@pytest.fixture
def rng(seed) -> np.random.Generator:
  return np.random.default_rng(seed)
