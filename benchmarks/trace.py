"""Reading JAX profiler traces: which kernels ran, for how long, and what part of the model each is.

* :func:`profile` runs a function under the JAX profiler and returns its GPU kernels and its CPU
  thunks (the XLA CPU runtime's per-op events), each with the HLO op the trace names.
  :func:`device_kernels` is the GPU half alone.
* :func:`summarize`: per-step microseconds by category, the idle part of the GPU span, and the
  largest kernels.
* :class:`HloModule` parses a compiled module's text (``jax.jit(f).lower(...).compile().as_text()``)
  and :meth:`HloModule.classify` puts one HLO op in a category, by what it contains and by the
  Python functions its operations were traced from (the ``stack_frame_id`` metadata of every HLO
  instruction and the module's stack-frame tables). :func:`name_category` is the fallback on the
  kernel's name when the op is not in the module.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile
from typing import Callable, NamedTuple

import jax

# ----------------------------------------------------------------------------------------------
# Trace events.


class Kernel(NamedTuple):
  """One kernel (GPU) or thunk (CPU) execution: the name in the trace, start and duration in ns,
  and the HLO op and module it ran for (``None`` where the trace does not say)."""

  name: str
  start_ns: float
  duration_ns: float
  hlo_op: str | None = None
  hlo_module: str | None = None


@dataclasses.dataclass
class Trace:
  gpu: list[Kernel]  # kernels on the GPU's stream lines
  cpu: list[Kernel]  # XLA CPU runtime thunks (events with an hlo_op), all threads
  lines: list[str]  # "<plane>: <line>" of the GPU planes, for the record


def _event(e) -> Kernel:
  stats = {}
  for k, v in e.stats:
    stats.setdefault(k, v)
  return Kernel(e.name, e.start_ns, e.duration_ns, stats.get("hlo_op"), stats.get("hlo_module"))


def profile(fn) -> Trace:
  """Runs ``fn()`` under the JAX profiler (blocking on its result) and reads the trace."""
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    try:
      jax.block_until_ready(fn())
    finally:
      jax.profiler.stop_trace()
    paths = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
    if not paths:
      return Trace([], [], [])
    data = jax.profiler.ProfileData.from_file(paths[0])
  gpu, cpu, lines = [], [], []
  for plane in data.planes:
    if plane.name.startswith("/device:GPU"):
      for line in plane.lines:
        lines.append(f"{plane.name}: {line.name}")
        if line.name.startswith("Stream"):  # XLA Modules / XLA Ops lines repeat the kernels
          gpu += [_event(e) for e in line.events]
    elif plane.name.startswith("/host:CPU"):
      for line in plane.lines:
        cpu += [k for k in map(_event, line.events) if k.hlo_op]
  return Trace(gpu, cpu, lines)


def device_kernels(fn) -> tuple[list[Kernel], list[str]]:
  """Runs ``fn()`` under the JAX profiler; returns its GPU kernels and the names of the trace's
  device lines (for the record). Empty off the GPU."""
  t = profile(fn)
  return t.gpu, t.lines


def short_name(name: str) -> str:
  """A kernel's name without its instance number: ``loop_add_fusion.12`` -> ``loop_add_fusion``."""
  return re.sub(r"[._]\d+$", "", name)[:80]


def summarize(kernels, steps: int, top: int, classify: Callable[[Kernel], tuple[str, str]],
              categories, idle: bool = True) -> dict:
  """Per-step microseconds by category and the ``top`` kernels by time.

  ``classify(kernel) -> (category, where)``; ``categories`` lists them in table order (``"idle"``
  among them: the span from the first kernel's start to the last one's end not covered by a
  kernel, when ``idle``). Kernels are grouped by :func:`short_name` and category."""
  if not kernels:
    return dict(kernels_per_step=None, busy_us=None, span_us=None, categories_us={}, top=[])
  per_cat = collections.Counter()
  per_name = {}
  for k in kernels:
    cat, where = classify(k)
    per_cat[cat] += k.duration_ns
    entry = per_name.setdefault((short_name(k.name), cat), [0, 0.0, collections.Counter()])
    entry[0] += 1
    entry[1] += k.duration_ns
    entry[2][where] += k.duration_ns
  start = min(k.start_ns for k in kernels)
  end = max(k.start_ns + k.duration_ns for k in kernels)
  busy = sum(k.duration_ns for k in kernels)
  cats = {c: per_cat[c] / steps / 1e3 for c in categories if c != "idle"}
  unknown = set(per_cat) - set(cats)
  if unknown:
    raise ValueError(f"classify gave categories outside {list(categories)}: {sorted(unknown)}")
  if idle and "idle" in categories:
    cats["idle"] = max(0.0, (end - start) - busy) / steps / 1e3
  ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
  return dict(kernels_per_step=len(kernels) / steps, busy_us=busy / steps / 1e3,
              span_us=(end - start) / steps / 1e3, categories_us=cats,
              top=[dict(name=n, category=cat, where=w.most_common(1)[0][0], per_step=c / steps,
                        us_per_step=t / steps / 1e3)
                   for (n, cat), (c, t, w) in ranked])


# ----------------------------------------------------------------------------------------------
# Categories.

MATMUL = "matmul"
SCAN = "scan"
CONV = "conv"
NORM = "norm"
LOSS = "loss"
OPTIMIZER = "optimizer"
COPIES = "copies/transposes"
OTHER = "other fusions"
IDLE = "idle"
CATEGORIES = (MATMUL, SCAN, CONV, NORM, LOSS, OPTIMIZER, COPIES, OTHER, IDLE)

MATMUL_NAME = re.compile(r"gemm|gemv|xmma|nvjet|cutlass|cublas|matmul|triton_dot|dot_")
SCAN_NAME = re.compile(r"ssm_fwd|ssm_bwd|selective_scan")
COPY_NAME = re.compile(r"memcpy|memset|copy|transpose")
MATMUL_TARGET = re.compile(r"cublas|gemm|matmul|cudnn\$conv")

# Python frames -> category: a frame matches when its file path matches ``file`` (searched) and
# its function name matches ``function`` (searched); None matches anything. An HLO op takes the
# category of the innermost frame of its stack that matches a rule (rules tried in this order).
FRAME_RULES = (
    (NORM, r"ssmax/nn/norm\.py$|flax/nnx/nn/normalization\.py$", None),
    (CONV, r"ssmax/nn/mixer\.py$", r"^MambaMixer\._conv\b"),
    (CONV, r"flax/nnx/nn/linear\.py$", r"^Conv\.__call__$"),
    (LOSS, r"optax/losses/", None),
    (LOSS, None, r"cross_entropy"),
    (OPTIMIZER, r"optax/", None),
    (OPTIMIZER, r"flax/nnx/training/optimizer\.py$", r"^Optimizer\.update$"),
    (SCAN, r"ssmax/scan/|ssmax/pallas/selective_scan", None),
)

# Opcodes that only move, cast or lay out data (and the bookkeeping ones). A fusion of nothing else
# is a copy; the others are "arithmetic" and vote on a fusion's category.
DATA_MOVEMENT = frozenset("""
    parameter constant bitcast reshape broadcast transpose copy slice dynamic-slice
    dynamic-update-slice concatenate pad reverse convert bitcast-convert gather tuple
    get-tuple-element iota copy-start copy-done optimization-barrier
    """.split())
CONTROL_FLOW = frozenset({"while", "conditional", "call", "async-start", "async-done"})


def frame_category(frames) -> tuple[str | None, str]:
  """``frames``: ``(file, function)`` innermost first -> ``(category or None, function)``: the
  innermost frame matching a :data:`FRAME_RULES` rule, else ``(None, innermost function)``."""
  for file, function in frames:
    for cat, file_re, fn_re in FRAME_RULES:
      if ((file_re is None or re.search(file_re, file))
          and (fn_re is None or re.search(fn_re, function))):
        return cat, function
  return None, frames[0][1] if frames else ""


def name_category(name: str) -> str:
  """The category from a kernel's name alone (no HLO op to look at)."""
  lower = name.lower()
  if SCAN_NAME.search(lower):
    return SCAN
  if MATMUL_NAME.search(lower):
    return MATMUL
  if COPY_NAME.search(lower):
    return COPIES
  return OTHER


# ----------------------------------------------------------------------------------------------
# The compiled HLO module.


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  calls: tuple[str, ...]  # computations it runs (fusion, while, call, conditional)
  target: str = ""  # custom_call_target
  groups: int = 1  # feature_group_count of a convolution
  frame: int = 0  # stack_frame_id (0: none)
  source: tuple[str, str] | None = None  # (source_file, "") from older metadata without frames


_SECTION = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")


class HloModule:
  """A compiled HLO module's instructions by name, its computations, and its stack frames.

  ``text``: ``compiled.as_text()``. The names are the ones profiler traces give as ``hlo_op``.
  """

  def __init__(self, text: str):
    self.name = ""
    self.computations: dict[str, list[Instruction]] = {}
    self.instructions: dict[str, Instruction] = {}
    tables = {k: {} for k in ("FileNames", "FunctionNames", "FileLocations", "StackFrames")}
    section, computation = None, None
    for line in text.splitlines():
      if line.startswith("HloModule "):
        self.name = line.split()[1].rstrip(",")
        continue
      if _SECTION.match(line):
        section = line.strip()
        continue
      if section is not None:
        if not line.strip():
          section = None
          continue
        key, _, value = line.strip().partition(" ")
        tables[section][int(key)] = value
        continue
      if computation is None:
        m = _COMPUTATION.match(line)
        if m:
          computation = self.computations.setdefault(m.group(1), [])
        continue
      if line.strip() == "}":
        computation = None
        continue
      inst = _parse_instruction(line)
      if inst is not None:
        computation.append(inst)
        self.instructions[inst.name] = inst
    self._frames = _frame_table(tables)

  def find(self, name: str | None) -> Instruction | None:
    """The instruction a trace names: ``name`` as is, or with its last ``_N`` read as ``.N``
    (kernel names replace the dot), or without a leading ``%``."""
    if not name:
      return None
    name = name.lstrip("%")
    for candidate in (name, re.sub(r"_(\d+)$", r".\1", name)):
      if candidate in self.instructions:
        return self.instructions[candidate]
    return None

  def stack(self, inst: Instruction) -> list[tuple[str, str]]:
    """``(file, function)`` of the instruction's Python stack, innermost first."""
    out, seen, frame = [], set(), inst.frame
    while frame and frame in self._frames and frame not in seen:
      seen.add(frame)
      file, function, frame = self._frames[frame]
      out.append((file, function))
    if not out and inst.source:
      out.append(inst.source)
    return out

  def ops(self, inst: Instruction) -> list[Instruction]:
    """What ``inst`` runs: a fusion's (or call's) instructions, nested fusions opened; else
    ``[inst]``. Reductions' ``to_apply`` regions are not opened (they are their combiners)."""
    if inst.opcode not in ("fusion", "call") or not inst.calls:
      return [inst]
    out = []
    for comp in inst.calls:
      for op in self.computations.get(comp, []):
        out += self.ops(op) if op.opcode in ("fusion", "call") else [op]
    return out

  def classify(self, inst: Instruction) -> tuple[str, str]:
    """``(category, where)`` of one instruction; see :func:`classify_ops`."""
    return classify_ops(self.ops(inst), self.stack)


def classify_ops(ops: list[Instruction], stack) -> tuple[str, str]:
  """The category of a kernel that runs ``ops`` (one HLO instruction, or a fusion's), and
  ``where``: the Python function that decided it (for a matmul: the one the product was traced
  from; for copies and other fusions: the most common innermost function of its ops).
  ``stack(op)``: the op's ``(file, function)`` frames, innermost first.

  In order, the first that holds:

  1. ``matmul``: a ``dot``, an ungrouped ``convolution`` or a cuBLAS/cuDNN custom call among them.
  2. ``conv``: a grouped ``convolution`` (depthwise) among them.
  3. a custom call (a Pallas kernel: Mosaic GPU or Triton): the category of its stack frames
     (:func:`frame_category`: the scan kernels' stacks pass through ``ssmax/pallas/
     selective_scan_*``), else ``other fusions``.
  4. ``copies/transposes``: no arithmetic op (every op in :data:`DATA_MOVEMENT`: copies,
     transposes, slices, concatenations, pads, dtype casts...).
  5. each arithmetic op votes for the category of its stack frames (:func:`frame_category`:
     ``norm``, ``conv``, ``loss``, ``optimizer``, ``scan`` or none); a category holding a strict
     majority of the arithmetic ops wins.
  6. ``other fusions``.
  """
  def where_of(items):
    items = [i for i in items if i]
    return collections.Counter(items).most_common(1)[0][0] if items else ""

  for op in ops:
    if (op.opcode == "dot" or (op.opcode == "convolution" and op.groups == 1)
        or (op.opcode == "custom-call" and MATMUL_TARGET.search(op.target.lower()))):
      return MATMUL, (where_of([f for _, f in stack(op)[:1]])
                      or (op.target if op.opcode == "custom-call" else op.opcode))
  if any(op.opcode == "convolution" for op in ops):
    return CONV, "grouped convolution"
  calls = [op for op in ops if op.opcode == "custom-call"]
  if calls:
    cat, where = frame_category(stack(calls[0]))
    if cat is None and SCAN_NAME.search(calls[0].target + calls[0].name):
      cat = SCAN
    return cat or OTHER, where or calls[0].target
  arithmetic = [op for op in ops if op.opcode not in DATA_MOVEMENT]
  if not arithmetic:
    return COPIES, where_of([frame_category(stack(op))[1] for op in ops])
  votes = [frame_category(stack(op)) for op in arithmetic]
  cat, n = collections.Counter(c for c, _ in votes).most_common(1)[0]
  if cat is not None and 2 * n > len(arithmetic):
    return cat, where_of([w for c, w in votes if c == cat])
  return OTHER, where_of([w for _, w in votes])


def _parse_instruction(line: str) -> Instruction | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  name, rest = m.groups()
  op = _OPCODE.search(" " + rest)
  if not op:
    return None
  calls = ()
  called = re.search(r"\bcalls=(\{[^}]*\}|%?[\w.\-]+)", rest)
  if called:
    calls = tuple(c.strip().lstrip("%") for c in called.group(1).strip("{}").split(","))
  body = re.search(r"\bbody=%?([\w.\-]+)", rest)
  if body:
    calls += (body.group(1),)
  target = re.search(r'custom_call_target="([^"]*)"', rest)
  groups = re.search(r"feature_group_count=(\d+)", rest)
  frame = re.search(r"\bstack_frame_id=(\d+)", rest)
  source = re.search(r'\bsource_file="([^"]*)"', rest)
  return Instruction(name=name, opcode=op.group(1), calls=calls,
                     target=target.group(1) if target else "",
                     groups=int(groups.group(1)) if groups else 1,
                     frame=int(frame.group(1)) if frame else 0,
                     source=(source.group(1), "") if source else None)


def _frame_table(tables) -> dict[int, tuple[str, str, int]]:
  """Frame id -> ``(file, function, parent id or 0)`` from the module's printed tables.

  XLA's printer (JAX 0.11) writes a frame's ``parent_frame_id`` as the parent's id plus one: a
  root frame prints 1 and frame 1 prints its own id, which no real parent link can be. A table in
  which some frame prints its own id is read that way; otherwise as printed (0: no parent)."""
  def fields(value):
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^\s}]+)', value)}

  files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
  functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
  locations = {k: fields(v) for k, v in tables["FileLocations"].items()}
  frames = {k: fields(v) for k, v in tables["StackFrames"].items()}
  shift = int(any(int(f.get("parent_frame_id", 0)) == k for k, f in frames.items()))
  out = {}
  for k, f in frames.items():
    loc = locations.get(int(f.get("file_location_id", 0)), {})
    parent = int(f.get("parent_frame_id", 0)) - shift
    out[k] = (files.get(int(loc.get("file_name_id", 0)), ""),
              functions.get(int(loc.get("function_name_id", 0)), ""),
              parent if parent >= 1 and parent != k else 0)
  return out
