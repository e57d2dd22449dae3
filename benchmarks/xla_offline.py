"""XLA's GPU compiler run for an H100 or H200 on a machine without a GPU, and its output read as a
list of kernels (no flags, so tests can import it; the command line is :mod:`benchmarks.hlo_report`).

JAX compiles for a "compile-only" CUDA device when given a target description (the device's SM
count, memory, bandwidth, compute capability: :data:`TARGETS`) instead of a GPU: the CUDA plugin
of :func:`benchmarks.sass.toolchain` (unpacked, not installed) is put on the path of a process that
runs JAX on the CPU, and ``jax.experimental.topologies`` makes the device. The compiled HLO then
holds what XLA would launch: every fusion, product, copy and custom call, in order. What it lacks:
autotuning needs a GPU, so the products' tilings (and split-K factors) are XLA's defaults, not the
tuned ones; the fusions around them are decided before tuning and are the GPU's. Nothing runs; no
timing comes from this.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re

import numpy as np

# What XLA needs to know of the device (a GpuTargetConfig text proto's gpu_device_info fields);
# SXM parts, from the vendor's data sheets: HBM bandwidth, memory size, L2.
_COMMON = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
               shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132,
               fpus_per_core=128, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
               block_dim_limit_z=65535, l2_cache_size=52428800, clock_rate_ghz=1.98,
               shared_memory_per_block_optin=232448, registers_per_core_limit=65536,
               registers_per_block_limit=65536)
TARGETS = {
    "h100": dict(_COMMON, memory_bandwidth=3352320000000, device_memory_size=85520809984,
                 description="NVIDIA H100 80GB HBM3"),
    "h200": dict(_COMMON, memory_bandwidth=4800000000000, device_memory_size=150754820096,
                 description="NVIDIA H200"),
}


def target_config(name: str) -> str:
  """The ``GpuTargetConfig`` text proto of target ``name``: a key of :data:`TARGETS`, or the path of
  a file holding one (as :func:`write_target_config` writes it on a GPU machine)."""
  if name not in TARGETS:
    path = pathlib.Path(name)
    if not path.is_file():
      raise ValueError(f"target must be one of {sorted(TARGETS)} or a GpuTargetConfig text proto "
                       f"file; got {name!r}")
    return path.read_text()
  t = dict(TARGETS[name])
  description = t.pop("description")
  fields = "".join(f"  {k}: {v}\n" for k, v in t.items())
  return (f"gpu_device_info {{\n{fields}  cuda_compute_capability {{\n    major: 9\n  }}\n}}\n"
          f'platform_name: "CUDA"\ndnn_version_info {{\n  major: 9\n  minor: 10\n}}\n'
          f"runtime_version {{\n  major: 13\n  minor: 0\n}}\n"
          f'device_description_str: "{description}"\n')


def write_target_config(path: str) -> str:
  """Writes this machine's GPU as a ``GpuTargetConfig`` text proto (needs the GPU); returns it.
  XLA's autotuning cache (``xla_gpu_per_fusion_autotune_cache_dir``) is keyed by this description,
  so a compile for it can reuse the tilings a GPU run chose."""
  import jax
  from jaxlib import xla_client

  text = xla_client.get_topology_for_devices(jax.devices()[:1]).target_config
  pathlib.Path(path).write_text(text)
  return text


def bandwidth(target: str) -> float:
  """Memory bandwidth in bytes/s of target ``name`` (see :func:`target_config`)."""
  m = re.search(r"memory_bandwidth: (\d+)", target_config(target))
  if m is None:
    raise ValueError(f"no memory_bandwidth in the target {target!r}")
  return float(m.group(1))


def compile_env(tools: dict) -> dict:
  """The environment of an XLA compiling process: :func:`benchmarks.sass.driver_env` (JAX on the
  CPU, the stand-in driver), the unpacked CUDA plugin importable (``jax_plugins.xla_cuda13``) and
  ptxas on PATH."""
  from benchmarks import sass

  root = tools["plugin"].parent.parent.parent  # <root>/jax_plugins/xla_cuda13/xla_cuda_plugin.so
  env = sass.driver_env(tools)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
  env["PATH"] = os.pathsep.join([str(pathlib.Path(tools["ptxas"]).parent), env.get("PATH", "")])
  return env


def replicated_sharding(target: str):
  """A sharding on one compile-only device of ``target``: give it to ``jax.ShapeDtypeStruct``s and
  ``jit(...).lower(...).compile()`` compiles for that GPU. Needs :func:`compile_env`'s process."""
  import jax
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(target),
                                          topology="1x1x1")
  mesh = topologies.make_mesh(topology, (1,), ("x",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract(tree, sharding):
  """``tree``'s arrays as ``ShapeDtypeStruct``s placed with ``sharding``."""
  import jax

  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# ----------------------------------------------------------------------------------------------
# Reading compiled HLO text.

_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|"
                    r"f64|c64|c128)\[([\d,]*)\]")
_BITS = dict(pred=8, s4=4, u4=4, s8=8, u8=8, s16=16, u16=16, s32=32, u32=32, s64=64, u64=64,
             f8e4m3fn=8, f8e5m2=8, bf16=16, f16=16, f32=32, f64=64, c64=64, c128=128)
# Instructions that launch nothing: aliases, tuples, loop plumbing, and the "-done" half of an
# asynchronous op (its "-start" is the launch).
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while",
         "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
         "fusion-done", "copy-done", "async-done"}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple's arrays summed): ``'(f32[4,2]{1,0}, s32[])'`` -> 36."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    total += n * _BITS[dtype] // 8
  return total


def computations(hlo: str) -> dict[str, list[str]]:
  """Instruction lines of each computation, by name."""
  out, current = {}, None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      out[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      out[current].append(line)
  return out


def loop_body(hlo: str, trip_count: int) -> str:
  """Name of the body computation of the (one) while loop that runs ``trip_count`` times."""
  bodies = sorted(set(re.findall(
      r" while\(.*?body=(%[\w.\-]+).*?\"known_trip_count\":\{\"n\":\"" + str(trip_count) + r"\"\}",
      hlo)))
  if len(bodies) != 1:
    raise ValueError(f"expected one while loop of {trip_count} iterations; found {len(bodies)}")
  return bodies[0]


def kernel_kind(op: str, rest: str) -> str:
  """What an instruction launches: ``product``, ``elementwise`` (XLA's loop fusions),
  ``reduction`` (input fusions), ``triton`` (other Triton fusions: norms, softmax), ``copy``,
  ``custom call: <target>`` or the opcode."""
  if op == "fusion":
    backend = re.search(r'"kind":"(\w+)"', rest)
    if backend and "gemm" in backend.group(1):
      return "product"
    if backend and "triton" in backend.group(1):
      return "triton"
    kind = re.search(r"kind=(\w+)", rest).group(1)
    return {"kLoop": "elementwise", "kInput": "reduction"}.get(kind, kind)
  if op == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', rest).group(1)
    return "product" if "gemm" in target.lower() or "matmul" in target.lower() else (
        f"custom call: {target}")
  return op


def kernels(hlo: str, computation: str) -> list[dict]:
  """The kernels ``computation`` launches, in order: name, kind (:func:`kernel_kind`), result
  shape and ``bytes``: its operands' and results' sizes (an upper bound on what it moves; an
  in-place update counts its whole buffer twice)."""
  lines = computations(hlo)[computation]
  shapes, out = {}, []
  for line in lines:
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = shape
    if op in _FREE:
      continue
    operands = re.findall(r"(%[\w.\-]+)", rest.split("), ")[0])
    moved = shape_bytes(shape) + sum(shape_bytes(shapes.get(o, "")) for o in operands)
    out.append(dict(name=name.lstrip("%"), kind=kernel_kind(op, rest), shape=re.sub(r"\{[^}]*\}", "", shape),
                    bytes=moved))
  return out


def family(name: str) -> str:
  """A kernel's name without XLA's numbering: ``loop_select_fusion.23`` -> ``loop_select_fusion``."""
  return re.sub(r"(\.\d+)+$", "", name)


def summary(ks: list[dict], bandwidth: float) -> dict:
  """Counts and bytes by kind, and the time those bytes take at ``bandwidth`` (bytes/s)."""
  by_kind = collections.defaultdict(lambda: dict(kernels=0, bytes=0))
  for k in ks:
    by_kind[k["kind"]]["kernels"] += 1
    by_kind[k["kind"]]["bytes"] += k["bytes"]
  total = sum(k["bytes"] for k in ks)
  return dict(kernels=len(ks), bytes=total, bandwidth_us=1e6 * total / bandwidth,
              by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["kernels"])),
              by_family=dict(collections.Counter(family(k["name"]) for k in ks).most_common()))
