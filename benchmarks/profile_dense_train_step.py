"""torch.profiler table of one transnext_tiny dense-backbone training step (UPerNet settings, batch 2).

    python benchmarks/profile_dense_train_step.py LOGITS_MIB SIZE [THREADS]

LOGITS_MIB sets WHOLE_LOGITS_BYTES_TRAINING. The 512 px profile quoted in docs/performance.md is in
docs/benchmarks/profile_dense_512_train.txt.
"""
import sys, time, torch
from torch.profiler import profile, ProfilerActivity
from transnext.ops import torch_backend
from transnext.benchmark.case import build_model
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
torch_backend.WHOLE_LOGITS_BYTES_TRAINING = int(float(sys.argv[1]) * 2**20)
size = int(sys.argv[2])
job = {"family": "transnext", "model": "transnext_tiny", "features": True,
       "build": {"drop_path_rate": 0.0, "img_size": [size, size], "pretrain_size": [224, 224], "pos_bias": "interpolate", "out_indices": [0,1,2,3]}}
m = build_model(job).train()
x = torch.randn(2, 3, size, size)
def step():
    out = m(x)
    sum(o.mean() for o in out).backward()
step()
t = time.perf_counter(); step(); print("step", time.perf_counter() - t, flush=True)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
