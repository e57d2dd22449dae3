"""The official kernel's times (official_scan_bench.main) and the peak memory of its fwd+bwd:
torch.cuda.max_memory_allocated over one call, the inputs and dout included (as XLA's peak of a
jitted fwd+bwd counts its arguments)."""
import json, os, sys
import torch
import official_scan_bench as osb

which = sys.argv[1:] or list(osb.CONFIGS)
osb.main(which)
out = os.environ.get("OUT", ".")
path = os.path.join(out, "official_scan.json")
res = json.load(open(path))
for name in which:
  b, l, d, n = osb.CONFIGS[name]
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
  out_ = osb.SS.apply(*leaves)
  grads = torch.autograd.grad(out_, leaves, dout)
  torch.cuda.synchronize()
  peak = torch.cuda.max_memory_allocated()
  res[f"{name}/mamba-cuda"].update(peak_fwdbwd_MiB=peak / 2**20, inputs_MiB=base / 2**20)
  print(f"{name:12s} mamba-cuda fwd+bwd peak {peak / 2**20:8.1f} MiB (inputs and dout "
        f"{base / 2**20:.1f})", flush=True)
  del leaves, dout, out_, grads
json.dump(res, open(path, "w"), indent=1)
