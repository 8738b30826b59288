"""A/B of the training-path switches on one case, in this process (run it alternately per variant).

    python benchmarks/training_paths_ab.py LOGITS_MIB SIZE BATCH {features|cls} {train|infer} REPEATS [VARIANT]

LOGITS_MIB sets ``WHOLE_LOGITS_BYTES_TRAINING`` (whole-tensor attention path below it, blocks
above); VARIANT ``nomlp`` turns the chunked bias MLP off, ``whole`` keeps the whole pooled-key
bias up to 16 MiB in training (the inference budget). ``features`` runs the transnext_tiny dense
backbone with the UPerNet settings, ``cls`` the classifier. Prints one JSON line: median and
fastest step (ms) and the peak RSS above the model (MB, default malloc), measured as
``transnext benchmark`` measures a case.
"""

import json
import sys

from transnext import ops
from transnext.benchmark.case import run_case
from transnext.models import transnext as model_module
from transnext.ops import torch_backend

mib, size, batch, feats = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "features"
mode, repeats = sys.argv[5], int(sys.argv[6])
variant = sys.argv[7] if len(sys.argv) > 7 else ""
torch_backend.WHOLE_LOGITS_BYTES_TRAINING = int(mib * 2**20)
if variant == "nomlp":
    ops.BIAS_MLP_CHUNK_ROWS = 1 << 40
if variant == "whole":
    model_module.AggregatedAttention.MATERIALIZE_BIAS_BYTES_TRAINING = 16 << 20
build = ({"drop_path_rate": 0.0, "img_size": [size, size], "pretrain_size": [224, 224], "pos_bias": "interpolate",
          "out_indices": [0, 1, 2, 3]} if feats else {})
job = {"family": "transnext", "model": "transnext_tiny", "backend": "torch", "size": [size, size], "batch": batch,
       "mode": mode, "compile": False, "build": build, "device": "cpu", "dtype": "fp32", "threads": 2, "warmup": 1,
       "repeats": repeats, "features": feats, "preset": "upernet" if feats else None}
r = run_case(job)
print(json.dumps({"logits_mib": mib, "variant": variant, "size": size, "batch": batch, "mode": mode,
                  "median_ms": round(r["latency_ms"]), "min_ms": round(r["latency_min_ms"]), "peak_mb": round(r["peak_mb"])}))
