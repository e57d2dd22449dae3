"""The official Mamba CUDA selective scan on this machine: its times and its fwd+bwd peak memory,
for ``bench_scan --official_json`` (GPU with PyTorch only; not run in CI).

Times come from ``official_scan_bench.py`` (``../shared/anchors``: it builds the kernel from
``$MAMBA_CSRC``, see its docstring) with its inputs; the peak is PyTorch's
``max_memory_allocated`` over one forward+backward call, the inputs and the output cotangent
included, as XLA's peak of a jitted forward+backward counts its arguments::

  PYTHONPATH=../shared/anchors MAMBA_CSRC=<folder>/csrc/selective_scan \\
      python benchmarks/official_scan_memory.py [130m-train 1.4b-train long-32k]

writes ``$OUT/official_scan.json`` (or ``./official_scan.json``).
"""
import json
import os
import sys

import official_scan_bench as osb
import torch


def peak_fwdbwd(b, l, d, n):
  """(peak bytes of one fwd+bwd, bytes allocated before it) with the benchmark's inputs."""
  torch.cuda.empty_cache()
  g = torch.Generator(device="cuda").manual_seed(0)
  bf = torch.bfloat16
  u = torch.randn(b, d, l, device="cuda", dtype=bf, generator=g)
  delta = (torch.randn(b, d, l, device="cuda", generator=g) * 0.5 - 2.0).to(bf)
  A = -torch.exp(torch.randn(d, n, device="cuda", generator=g) * 0.5)
  Bm = torch.randn(b, 1, n, l, device="cuda", dtype=bf, generator=g)
  Cm = torch.randn(b, 1, n, l, device="cuda", dtype=bf, generator=g)
  D = torch.ones(d, device="cuda")
  z = torch.randn(b, d, l, device="cuda", dtype=bf, generator=g)
  db = torch.full((d,), -1.0, device="cuda")
  leaves = [t.detach().clone().requires_grad_(True) for t in (u, delta, A, Bm, Cm, D, z, db)]
  del u, delta, A, Bm, Cm, D, z, db
  dout = torch.randn(b, d, l, device="cuda", dtype=bf, generator=g)
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  base = torch.cuda.memory_allocated()
  grads = torch.autograd.grad(osb.SS.apply(*leaves), leaves, dout)
  torch.cuda.synchronize()
  del grads
  return torch.cuda.max_memory_allocated(), base


def main(which):
  osb.main(which)  # builds the kernel, times it, writes official_scan.json
  path = os.path.join(os.environ.get("OUT", "."), "official_scan.json")
  res = json.load(open(path))
  for name in which:
    peak, base = peak_fwdbwd(*osb.CONFIGS[name])
    res[f"{name}/mamba-cuda"].update(peak_fwdbwd_MiB=peak / 2**20, inputs_MiB=base / 2**20)
    print(f"{name:12s} mamba-cuda fwd+bwd peak {peak / 2**20:8.1f} MiB (inputs and dout "
          f"{base / 2**20:.1f})", flush=True)
  json.dump(res, open(path, "w"), indent=1)


if __name__ == "__main__":
  main(sys.argv[1:] or list(osb.CONFIGS))
