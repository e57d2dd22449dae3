"""What every benchmark script shares: timing, memory, failures, tables, and where results go.

* :func:`median_seconds`: compile-and-warm-up calls, then the median of timed calls, each blocked
  until its result is ready (optionally several calls enqueued back to back per measurement).
* :func:`compile_timed`, :func:`compiled_peak_bytes`, :func:`device_peak_bytes`: compile time and
  peak memory, XLA's estimate for a compiled call and the device allocator's high-water mark.
* :func:`is_oom`, :func:`attempt`: a configuration that runs out of memory or fails otherwise
  becomes a row that says so; the sweep goes on.
* :class:`Run`: one run of a benchmark, written to ``results/<benchmark>/<date>_<device>[_<tag>]/``
  (``<benchmark>.json``, ``.md``, ``.png``, ``.log`` and a README with the command), rewritten after
  every row so that a sweep cut short keeps what it measured, and registered in
  ``results/<benchmark>/INDEX.json``, which names the current run.
* :func:`current_run`, :func:`load_current`: read the current run of a benchmark.

Every script defines the flags of :func:`define_flags` (``--results_dir``, ``--out_dir``,
``--tag``, ``--current``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import jax
import numpy as np
from absl import app

from experiments.plotting import markdown_table  # noqa: F401  (the scripts' one table printer)

RESULTS_ROOT = pathlib.Path(__file__).resolve().parent.parent / "results"
INDEX = "INDEX.json"


# ----------------------------------------------------------------------------------------------
# Timing, compile time, memory.


def median_seconds(fn: Callable[[], Any], *, repeats: int, warmup: int = 2, inner: int = 1,
                   budget_s: float | None = None) -> float:
  """Median seconds of one ``fn()`` call.

  ``warmup`` untimed calls come first (the first compiles; with ``scan_backend="pallas"`` a second
  call was seen to compile again). Each of the ``repeats`` measurements enqueues ``inner`` calls
  back to back and blocks on the last, so launch gaps between calls are hidden; the time is divided
  by ``inner``. With ``budget_s``, slow calls get fewer measurements (at least 3), judged from the
  first call.
  """
  start = time.perf_counter()
  jax.block_until_ready(fn())
  one = time.perf_counter() - start
  for _ in range(warmup - 1):
    jax.block_until_ready(fn())
  if budget_s is not None:
    inner = max(1, min(inner, int(budget_s / 10 / max(one, 1e-6))))
    repeats = max(3, min(repeats, int(budget_s / (inner * max(one, 1e-6)))))
  return statistics.median(_measure(fn, inner) for _ in range(repeats))


def _measure(fn: Callable[[], Any], inner: int) -> float:
  """Seconds of one ``fn()`` call: ``inner`` calls enqueued back to back, blocking on the last."""
  start = time.perf_counter()
  out = None
  for _ in range(inner):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / inner


def paired_seconds(fn_a: Callable[[], Any], fn_b: Callable[[], Any], *, repeats: int,
                   warmup: int = 2, inner: int = 1) -> dict:
  """Times ``fn_a`` and ``fn_b`` alternately, ``repeats`` measurements each (``inner`` calls a
  measurement, as :func:`median_seconds`), so that a drift in the device's speed hits both alike.

  Returns ``{"a": median seconds, "b": median seconds, "ratio": median of the per-pair ratios
  b / a, "ratio_q25", "ratio_q75"}``: the ratio of each pair of neighbouring measurements, so that
  slow and fast spells cancel.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn_a())
    jax.block_until_ready(fn_b())

  a, b = [], []
  for i in range(repeats):  # a-b, then b-a: neither always goes first
    if i % 2:
      b.append(_measure(fn_b, inner)); a.append(_measure(fn_a, inner))
    else:
      a.append(_measure(fn_a, inner)); b.append(_measure(fn_b, inner))
  ratios = sorted(y / x for x, y in zip(a, b))
  q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]
  return {"a": statistics.median(a), "b": statistics.median(b),
          "ratio": statistics.median(ratios), "ratio_q25": q(0.25), "ratio_q75": q(0.75)}


def compile_timed(jitted, *args) -> tuple[Any, float]:
  """``(compiled, seconds)``: ``jitted`` lowered for ``args`` and compiled, and how long it took."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def compiled_peak_bytes(compiled) -> int | None:
  """XLA's peak estimate for a compiled call (arguments + outputs + temporaries - aliased), or
  ``None`` where the platform gives no memory analysis."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  peak = getattr(m, "peak_memory_in_bytes", 0)
  if peak:
    return int(peak)
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def device_peak_bytes() -> int | None:
  """The device allocator's high-water mark since the process started (GPU only, else ``None``)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def rel_err(got, want) -> float:
  """max |got - want| / max |want|, in float64."""
  got, want = np.asarray(got).astype(np.float64), np.asarray(want).astype(np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# ----------------------------------------------------------------------------------------------
# Failures.


def is_oom(error: BaseException) -> bool:
  """Whether ``error`` is the device running out of memory (XLA's RESOURCE_EXHAUSTED)."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def failure_status(error: BaseException) -> str:
  """``"OOM"`` or ``"error: <type>: <message>"`` (cut to 300 characters)."""
  return "OOM" if is_oom(error) else f"error: {type(error).__name__}: {str(error)[:300]}"


def attempt(measure: Callable[[], dict], log: Callable[[str], None] = print) -> dict:
  """``{"status": "ok", **measure()}``, or ``{"status": "OOM" | "error: ..."}`` if it raised (the
  traceback of an error other than OOM goes to ``log``)."""
  try:
    return {"status": "ok", **measure()}
  except Exception as e:  # one configuration failing must not end the sweep
    status = failure_status(e)
    if status != "OOM":
      log(traceback.format_exc())
    return {"status": status}


# ----------------------------------------------------------------------------------------------
# Where results go.


def define_flags(flags_module) -> None:
  """The flags every benchmark script has (``flags_module`` is ``absl.flags``)."""
  flags_module.DEFINE_string("results_dir", str(RESULTS_ROOT),
                             "Root of the results; a run goes to <root>/<benchmark>/<date>_<device>"
                             "[_<tag>]/.")
  flags_module.DEFINE_string("out_dir", None, "Write the run here instead (not indexed).")
  flags_module.DEFINE_string("tag", None, "Suffix of the run folder's name, e.g. run2.")
  flags_module.DEFINE_bool("current", False, "Name this run the current one in INDEX.json (the "
                           "first run of a benchmark is current anyway).")


def device_slug(device: jax.Device | None = None) -> str:
  """A short lower-case name of the device: ``h100``, ``a100``, ``cpu``."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return "cpu"
  kind = device.device_kind.lower()
  found = re.search(r"\b([a-z]+\d+[a-z]?)\b", kind.replace("nvidia ", ""))
  return found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", kind).strip("-")


def device_slug_of_child() -> str:
  """:func:`device_slug` asked of a fresh process, for a parent that must leave the device alone
  (initialising it would preallocate the memory its children measure)."""
  proc = subprocess.run([sys.executable, "-c", "from benchmarks.harness import device_slug; "
                         "print(device_slug())"], capture_output=True, text=True, check=True)
  return proc.stdout.split()[-1]


def run_worker(module: str, spec: dict, env: dict | None = None) -> None:
  """Runs ``python -m <module> --worker=<spec as JSON>`` (a script's own worker mode, for work
  that needs a process of its own environment) and raises with the end of its stderr if it
  fails."""
  proc = subprocess.run([sys.executable, "-m", module, f"--worker={json.dumps(spec)}"], env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{module} --worker failed for {spec}:\n{proc.stderr[-3000:]}")


def run_name(date: datetime.date | None = None, device: str | None = None,
             tag: str | None = None) -> str:
  name = f"{(date or datetime.date.today()).isoformat()}_{device or device_slug()}"
  return f"{name}_{tag}" if tag else name


class Run:
  """One run of ``benchmark``: its folder, its record (``self.record``, JSON) and its log.

  ``out_dir`` given: the run is written there and not indexed. Otherwise it goes to
  ``results_dir/<benchmark>/<run_name>`` (``_2``, ``_3``... appended if that folder is taken) and
  :meth:`finish` lists it in the benchmark's ``INDEX.json``, as the current run if ``current`` or if
  there is none yet. ``device`` names the folder (default: this process's first device; a script
  that must not touch the device passes it).
  """

  def __init__(self, benchmark: str, *, results_dir=RESULTS_ROOT, out_dir=None, tag=None,
               current=False, device: str | None = None, meta: dict | None = None):
    self.benchmark = benchmark
    self.current = current
    if out_dir is not None:
      self.dir, self.index = pathlib.Path(out_dir), None
    else:
      parent = pathlib.Path(results_dir) / benchmark
      name = run_name(device=device, tag=tag)
      self.dir, k = parent / name, 2
      while self.dir.exists() and any(self.dir.iterdir()):
        self.dir, k = parent / f"{name}_{k}", k + 1
      self.index = parent / INDEX
    self.dir.mkdir(parents=True, exist_ok=True)
    self.command = " ".join(["python -m", f"benchmarks.{benchmark}"] +
                            [shlex.quote(a) for a in sys.argv[1:]])
    self.record = dict(command=self.command, date=datetime.date.today().isoformat(),
                       jax=jax.__version__, **(meta or {}))
    self._log = (self.dir / f"{benchmark}.log").open("a")

  def path(self, suffix: str) -> pathlib.Path:
    """``<run dir>/<benchmark><suffix>``, e.g. ``path(".png")``."""
    return self.dir / f"{self.benchmark}{suffix}"

  def log(self, text: str) -> None:
    """Prints ``text`` and appends it to the run's log."""
    print(text, flush=True)
    self._log.write(text + "\n")
    self._log.flush()

  def save(self, tables: str | None = None, plot: Callable[[dict, pathlib.Path], None] | None = None):
    """Writes the record as JSON, ``tables`` as Markdown and ``plot(record, path)`` as PNG."""
    self.path(".json").write_text(json.dumps(self.record, indent=1, default=str) + "\n")
    if tables is not None:
      self.path(".md").write_text(tables + "\n")
    if plot is not None:
      plot(self.record, self.path(".png"))

  def finish(self, note: str = "") -> pathlib.Path:
    """Writes the run's README and lists the run in the index; returns the run folder."""
    (self.dir / "README.md").write_text(
        f"# {self.benchmark}, {self.dir.name}\n\n{self.record.get('device', '')}, JAX "
        f"{jax.__version__}, {self.record['date']}.\n\nCommand:\n\n    {self.command}\n\n"
        + (note + "\n" if note else ""))
    self._log.close()
    if self.index is not None:
      index = read_index(self.index.parent) or dict(benchmark=self.benchmark, current=None, runs=[])
      index["runs"] = [r for r in index["runs"] if r["run"] != self.dir.name] + [dict(
          run=self.dir.name, date=self.record["date"], device=self.record.get("device"),
          command=self.command, note=note)]
      if self.current or not index.get("current"):
        index["current"] = self.dir.name
      self.index.write_text(json.dumps(index, indent=1) + "\n")
    return self.dir


def read_index(benchmark_dir: pathlib.Path) -> dict | None:
  path = pathlib.Path(benchmark_dir) / INDEX
  return json.loads(path.read_text()) if path.is_file() else None


def current_run(benchmark: str, results_dir=RESULTS_ROOT) -> pathlib.Path | None:
  """The folder of ``benchmark``'s current run as its ``INDEX.json`` names it (``None``: no index)."""
  index = read_index(pathlib.Path(results_dir) / benchmark)
  if not index or not index.get("current"):
    return None
  return pathlib.Path(results_dir) / benchmark / index["current"]


def load_current(benchmark: str, results_dir=RESULTS_ROOT) -> dict[str, dict]:
  """The JSON files of ``benchmark``'s current run, by file stem (``{}`` when there is none)."""
  folder = current_run(benchmark, results_dir)
  if folder is None:
    return {}
  return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def check_choices(flag: str, values, allowed) -> None:
  """Raises a usage error naming ``--flag`` unless every value is among ``allowed``."""
  for v in values:
    if v not in allowed:
      raise app.UsageError(f"--{flag} must be from {sorted(allowed)}; got {v!r}")


def parse_configs(spec: str) -> list[tuple[str, dict]]:
  """Named keyword sets from the command line: ``"c8:chunk=8;w4:bwd_num_warps=4,layout=tile"`` ->
  ``[("c8", {"chunk": 8}), ("w4", {"bwd_num_warps": 4, "layout": "tile"})]``. Values become int,
  float or bool where they read as one, else stay strings."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    name, _, body = item.partition(":")
    kv = {}
    for pair in filter(None, body.split(",")):
      k, _, v = pair.partition("=")
      kv[k.strip()] = parse_value(v.strip())
    out.append((name.strip(), kv))
  return out


def parse_value(text: str):
  """``text`` as an int, float or bool where it reads as one, else itself."""
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


@dataclasses.dataclass
class Deadline:
  """After ``minutes`` (``None``: never), :meth:`passed` is true: start no new configuration."""

  minutes: float | None

  def __post_init__(self):
    self._end = None if self.minutes is None else time.monotonic() + 60 * self.minutes

  def passed(self) -> bool:
    return self._end is not None and time.monotonic() > self._end


def count(n: int) -> str:
  """Parameter count as ``1.37B``, ``129M`` or ``51K``."""
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g}{unit}"
  return str(n)
