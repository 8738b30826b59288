"""torch.profiler table of one transnext_tiny dense-backbone forward (no grad), Mask R-CNN settings.

    python benchmarks/profile_dense_infer.py [HEIGHT WIDTH [THREADS]]

Defaults: 800 x 1344, 2 threads, the bias interpolated from an 800 grid. The native kernels
appear as ``transnext::native_*`` rows. The profile quoted in docs/performance.md is in
docs/benchmarks/profile_dense_800x1344_infer.txt.
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from transnext.benchmark.case import build_model

H = int(sys.argv[1]) if len(sys.argv) > 1 else 800
W = int(sys.argv[2]) if len(sys.argv) > 2 else 1344
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
job = {"family": "transnext", "model": "transnext_tiny", "features": True,
       "build": {"drop_path_rate": 0.0, "img_size": [800, 800], "pretrain_size": [224, 224], "pos_bias": "interpolate",
                 "out_indices": [0, 1, 2, 3]}}
m = build_model(job).eval()
x = torch.randn(1, 3, H, W)
with torch.no_grad():
    m(x)
    t = time.perf_counter()
    m(x)
    print(f"forward {time.perf_counter() - t:.2f} s", flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m(x)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
