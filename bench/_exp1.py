import sys

import torch

sys.path.insert(0, "bench")
import bench_int4 as B

from scout_mm.kernels import int4
from scout_mm.kernels import int4_moe_decode as M

H, I, E, G = 5120, 8192, 16, 128
gate_up = B.packed((E,), H, 2 * I, 1)[0]; down = B.packed((E,), I, H, 1)[0]
shipped = dict(int4.TUNED["gemv"])
r = dict(shipped, _maxnreg=128)
for tokens, top_k in ((1, 1), (1, 2)):
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(tokens, top_k, device="cuda", dtype=torch.bfloat16)
    routes = [torch.rand(tokens, E, device="cuda").argsort(dim=1)[:, :top_k] for _ in range(8)]
    pick = B.rotating(routes)
    ref = None
    for label, fused, cfg in [("two", False, shipped), ("fused r128", True, r), ("fused static r128", True, dict(r, _static=True)),
                              ("fused gate_up only r128", True, dict(r, _phases=1)),
                              ("fused static gate_up only r128", True, dict(r, _phases=1, _static=True)),
                              ("fused r128 3.5/SM", True, dict(r, persistent_per_sm=3.5)),
                              ("fused r128 4.25/SM", True, dict(r, persistent_per_sm=4.25)),
                              ("fused static r128 down .ca", True, dict(r, _static=True, _down_cache="")),
                              ("two", False, shipped)]:
        int4.FUSED_DECODE_MOE = fused
        t = B.graph_us(lambda c=cfg: int4.int4_moe_experts(x, w, pick(), gate_up, down, G, config=c))
        extra = ""
        if fused:
            k = M.LAST
            extra = f"regs {k.n_regs} spills {k.n_spills}"
        print(f"T={tokens} top{top_k} {label}: {t:.1f} us {extra}", flush=True)
    # two-launch gate_up alone
    int4.FUSED_DECODE_MOE = False
    route = int4.DirectRoute(routes[0], E)
    t = B.graph_us(lambda: int4._launch_gemv(x, gate_up, G, 1, tokens * top_k, int4.DirectRoute(pick(), E), shipped, w))
    print(f"T={tokens} top{top_k} two-launch gate_up alone: {t:.1f} us", flush=True)
