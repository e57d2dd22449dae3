"""Compiling Mosaic GPU kernels for sm_90a without a GPU, and reading what comes out (no flags,
so tests can import it; the command line is :mod:`benchmarks.sass_report`).

Lowering a kernel for ``cuda`` needs no GPU. Compiling it does: the CUDA plugin's Mosaic GPU
compiler (``MosaicGpuCompile``) asks the driver which GPU it targets. Here it asks a stand-in
driver (a small C library built on the spot) that answers "sm_90, 132 SMs" and accepts the module;
the compiler's own dumps give the PTX and ptxas's report, and ``ptxas`` + ``nvdisasm`` give the
SASS. Nothing runs; no timing comes from this.

Per innermost loop (per warp and iteration, one SM sub-partition): *issue* = instructions (one a
clock); *MUFU* = 8 clocks per MUFU instruction (``ex2``, ``lg2``, ``rcp``: 16 lanes a clock per
SM on sm_90); *FMA pipe* = FFMA/FMUL/FADD (32 lanes a clock per sub-partition). The largest is the
loop's static bound; memory and latency are not in it.

The toolchain (the ``jax-cuda13-pjrt`` and ``jax-cuda13-plugin`` wheels of this JAX version and
``nvidia-cuda-nvdisasm``, ~140 MB) is downloaded with pip into a folder (not installed: JAX must
not find a CUDA plugin); ``ptxas`` and a C compiler come from the machine (``CUDA_HOME``,
``PATH``).
"""

from __future__ import annotations

import collections
import ctypes
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

# sm_90 (H100 / H200): per SM.
REGS_PER_SM, SMEM_PER_SM, SMEM_RESERVED, MAX_THREADS, MAX_CTAS = 65536, 233472, 1024, 2048, 32
MUFU_CLOCKS = 8  # a warp's MUFU instruction: 32 lanes at 4 a clock per sub-partition
FMA_PIPE = ("FFMA", "FMUL", "FADD")

_DRIVER_C = r"""
// Stand-in CUDA driver: one sm_90 device with 132 SMs; every call succeeds. For compiling only.
#include <string.h>
#include <stddef.h>
typedef int CUresult;
static char mem[1 << 16];
CUresult cuInit(unsigned f) { return 0; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int* c) { *c = 1; return 0; }
CUresult cuDeviceGet(int* d, int o) { *d = 0; return 0; }
CUresult cuCtxGetDevice(int* d) { *d = 0; return 0; }
CUresult cuCtxGetCurrent(void** c) { *c = mem; return 0; }
CUresult cuCtxSetCurrent(void* c) { return 0; }
CUresult cuCtxPushCurrent_v2(void* c) { return 0; }
CUresult cuCtxPopCurrent_v2(void** c) { if (c) *c = mem; return 0; }
CUresult cuDevicePrimaryCtxRetain(void** c, int d) { *c = mem; return 0; }
CUresult cuDeviceGetName(char* n, int len, int d) { strncpy(n, "sm_90", len); return 0; }
CUresult cuDeviceGetAttribute(int* v, int attr, int d) {
  switch (attr) {
    case 75: *v = 9; break;        // compute capability major
    case 76: *v = 0; break;        // minor
    case 16: *v = 132; break;      // SMs
    case 97: *v = 232448; break;   // shared memory per block (opt-in)
    case 81: *v = 233472; break;   // shared memory per SM
    case 8: *v = 49152; break;     // shared memory per block
    case 1: *v = 1024; break;      // threads per block
    case 10: *v = 32; break;       // warp size
    default: *v = 1;
  }
  return 0;
}
CUresult cuGetErrorString(CUresult e, const char** s) { *s = "stand-in driver"; return 0; }
CUresult cuGetErrorName(CUresult e, const char** s) { *s = "STAND_IN"; return 0; }
CUresult cuModuleLoadData(void** m, const void* i) { *m = mem; return 0; }
CUresult cuModuleLoadDataEx(void** m, const void* i, unsigned n, void* o, void** v) {
  *m = mem; return 0; }
CUresult cuModuleGetFunction(void** f, void* m, const char* n) { *f = mem; return 0; }
CUresult cuModuleGetGlobal_v2(unsigned long long* p, size_t* s, void* m, const char* n) {
  *p = 4096; if (s) *s = 8; return 0; }
CUresult cuModuleUnload(void* m) { return 0; }
CUresult cuFuncSetAttribute(void* f, int a, int v) { return 0; }
CUresult cuFuncGetAttribute(int* v, int a, void* f) { *v = 0; return 0; }
"""


# ----------------------------------------------------------------------------------------------
# The toolchain.


def toolchain(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Paths of the plugin library, the Mosaic GPU runtime, the stand-in driver's folder, ptxas and
  nvdisasm, fetched or built into ``root`` when missing."""
  import jax

  root.mkdir(parents=True, exist_ok=True)
  plugin = root / "jax_plugins" / "xla_cuda13" / "xla_cuda_plugin.so"
  runtime = root / "jax_cuda13_plugin" / "libmosaic_gpu_runtime.so"
  nvdisasm = root / "nvidia" / "cu13" / "bin" / "nvdisasm"
  wanted = {plugin: f"jax-cuda13-pjrt=={jax.__version__}",
            runtime: f"jax-cuda13-plugin=={jax.__version__}", nvdisasm: "nvidia-cuda-nvdisasm"}
  for path, spec in wanted.items():
    if path.exists():
      continue
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-d", str(wheels), spec], check=True, capture_output=True)
    name = spec.split("=")[0].replace("-", "_")
    for wheel in wheels.glob(f"{name}-*.whl"):
      with zipfile.ZipFile(wheel) as z:
        z.extractall(root)
    if not path.exists():
      raise RuntimeError(f"{spec} did not provide {path}")
    path.chmod(0o755)
  driver = root / "driver" / "libcuda.so.1"
  if not driver.exists():
    driver.parent.mkdir(exist_ok=True)
    source = driver.parent / "driver.c"
    source.write_text(_DRIVER_C)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
      raise RuntimeError("a C compiler (cc or gcc) is needed to build the stand-in driver")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(driver), str(source)], check=True)
  ptxas = _find_ptxas()
  return dict(plugin=plugin, runtime=runtime, driver=driver.parent, ptxas=ptxas,
              nvdisasm=nvdisasm)


def _find_ptxas() -> pathlib.Path:
  for d in filter(None, [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]):
    p = pathlib.Path(d) / "bin" / "ptxas"
    if p.exists():
      return p
  found = shutil.which("ptxas")
  if found is None:
    raise RuntimeError("ptxas not found: set CUDA_HOME or put it on PATH")
  return pathlib.Path(found)


# ----------------------------------------------------------------------------------------------
# Compiling: the modules a lowering produced, in a process whose library path holds the driver.


def compile_known_kernels(plugin: str) -> int:
  """Compiles every Mosaic GPU module lowered so far in this process (the dumps go where the
  ``MOSAIC_GPU_DUMP_*`` variables say); returns how many."""
  from jax.experimental.mosaic.gpu import core

  compile_ = ctypes.CDLL(plugin).MosaicGpuCompile
  compile_.argtypes = [ctypes.c_char_p, ctypes.c_int]
  compile_.restype = ctypes.POINTER(ctypes.c_void_p)
  for asm in core.KNOWN_KERNELS.values():
    if not compile_(ctypes.c_char_p(asm), ctypes.c_int(len(asm))):
      raise RuntimeError("MosaicGpuCompile failed")
  return len(core.KNOWN_KERNELS)


def driver_env(tools: dict) -> dict:
  """This process's environment with JAX on the CPU and the stand-in driver first on the library
  path: the base of every compiling process."""
  libs = os.pathsep.join(filter(None, [str(tools["driver"]), os.environ.get("LD_LIBRARY_PATH")]))
  return dict(os.environ, LD_LIBRARY_PATH=libs, JAX_PLATFORMS="cpu")


def compile_env(tools: dict, dump: pathlib.Path) -> dict:
  """The environment of a Mosaic GPU compiling process: :func:`driver_env`, the Mosaic GPU runtime,
  and the PTX and ptxas dumps into ``dump``."""
  return dict(driver_env(tools), MOSAIC_GPU_RUNTIME_LIB_PATH=str(tools["runtime"]),
              MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=str(dump))


# ----------------------------------------------------------------------------------------------
# Reading what came out.


def kernel_report(ptx: pathlib.Path, tools: dict) -> dict:
  """Registers, spills, shared memory, CTAs per SM and the innermost loops of one kernel."""
  stem = ptx.with_suffix("")
  info = stem.with_suffix(".ptxas").read_text()  # both written by the compiler's dumps
  regs = int(_find(r"Used (\d+) registers", info, "ptxas report"))
  spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill", info))
  resources = stem.with_suffix(".resources.txt").read_text()
  smem = int(_find(r"smem_scratch_bytes=(\d+)", resources, "Mosaic GPU resources"))
  threads = _threads(ptx.read_text())
  cubin = stem.with_suffix(".cubin")
  subprocess.run([str(tools["ptxas"]), "-arch=sm_90a", str(ptx), "-o", str(cubin)], check=True)
  sass = subprocess.run([str(tools["nvdisasm"]), "-c", str(cubin)], check=True,
                        capture_output=True, text=True).stdout
  stem.with_suffix(".sass").write_text(sass)
  return dict(kernel=stem.name, registers=regs, spill_bytes=spills, smem_bytes=smem,
              threads=threads, **occupancy(regs, smem, threads), loops=inner_loops(sass))


def _find(pattern: str, text: str, what: str) -> str:
  m = re.search(pattern, text)
  if m is None:
    raise ValueError(f"no {pattern!r} in the {what}")
  return m.group(1)


def _threads(ptx: str) -> int:
  """Threads per CTA from the PTX entry's ``.reqntid`` / ``.maxntid`` (Mosaic GPU writes one)."""
  m = re.search(r"\.(?:reqntid|maxntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", ptx)
  if m is None:
    raise ValueError("the PTX names no .reqntid or .maxntid: threads per CTA unknown")
  return math.prod(int(x) for x in m.groups() if x)


def occupancy(regs: int, smem: int, threads: int) -> dict:
  """CTAs per SM on sm_90 and what limits them."""
  warps = -(-threads // 32)
  per_warp = -(-regs * 32 // 256) * 256
  limits = dict(registers=REGS_PER_SM // (per_warp * warps),
                smem=SMEM_PER_SM // (smem + SMEM_RESERVED) if smem else MAX_CTAS,
                threads=MAX_THREADS // threads, ctas=MAX_CTAS)
  by = min(limits, key=limits.get)
  return dict(ctas_per_sm=limits[by], limited_by=by, warps_per_sm=limits[by] * warps)


_INSTR = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def inner_loops(listing: str) -> list[dict]:
  """Loops (a label and a later branch back to it) that hold no other loop, largest first: each
  with its opcode counts and static clocks per iteration and warp. Loops of fewer than 16
  instructions (waits on a barrier, spin loops) are left out: they bound nothing."""
  lines = listing.splitlines()
  labels, spans = {}, []
  for i, line in enumerate(lines):
    if m := _LABEL.match(line):
      labels[m.group(1)] = i
    elif (m := _BRANCH.search(line)) and m.group(1) in labels:
      spans.append((labels[m.group(1)], i))
  inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
  out = []
  for start, end in inner:
    ops = collections.Counter(m.group(1) for line in lines[start:end + 1]
                              if (m := _INSTR.match(line)))
    total = sum(ops.values())
    if total < 16:
      continue
    clocks = dict(issue=total, mufu=MUFU_CLOCKS * ops["MUFU"], fma=sum(ops[o] for o in FMA_PIPE))
    out.append(dict(instructions=total, opcodes=dict(ops.most_common()), clocks=clocks,
                    bound=max(clocks, key=clocks.get)))
  return sorted(out, key=lambda x: -x["instructions"])
