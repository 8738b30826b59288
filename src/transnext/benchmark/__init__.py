"""Speed and memory of the ops backends and of peer models, side by side, from one invocation.

``transnext benchmark`` (or ``python -m transnext.benchmark``) runs every combination of
sizes x batch sizes x modes (x eager/compiled) x models, where the models are the transnext
variants under each attention backend and, with ``--peers``, timm models run through the same
protocol. Each case runs in a **fresh subprocess** with the same thread count, so its peak memory
is its own:

* CPU: peak resident set size (``VmHWM``; ``ru_maxrss`` where it cannot be reset) minus the RSS
  after building the model and one tiny no-grad forward that loads the compute kernels. For
  training this includes gradients and optimizer state. glibc's default malloc keeps freed
  blocks of up to 32 MiB resident and adapts that limit as the program runs, so its RSS peak
  drifts between runs and iterations. The headline figure (``peak_mb``) therefore comes from a
  second fresh process per case that runs two steps with ``MALLOC_MMAP_THRESHOLD_=262144``
  (every block from 256 KiB up is returned to the system when freed), which tracks what the step
  actually holds; the RSS peak of the timing process under the default allocator is reported too
  (``peak_default_mb``). The first step also builds the size-dependent tables (position bias of
  a new input size, optimizer state); the peak of the second step alone is ``steady_peak_mb``.
* CUDA: allocator statistics, ``torch.cuda.max_memory_allocated()`` minus the memory allocated
  after building.

A case runs ``warmup`` untimed iterations, then ``repeats`` timed ones; the median is reported.
``infer`` is a no-grad forward; ``train`` is forward, loss (cross-entropy; in ``--features`` mode
the sum of the feature maps' means), backward and an AdamW step. ``--compile`` adds every case
under ``torch.compile``: the first, compiling call is timed on its own (``compile_s``) and left
out of the timing; memory counts from after it (what the compiler keeps resident is
``compile_resident_mb``; AdamW state is counted as in eager cases). Achieved GFLOP/s counts the model's matrix-product and
convolution FLOPs (two per multiply-add, counted by :mod:`transnext.integrations.flops` for
every model, transnext's local window in matrix form, the same count for every backend; a
training step counts three forward passes) and is compared with the fp32 matrix-multiply rate
measured in the same invocation and thread count. The ``reference`` backend selects the
reference formulation throughout (unfold attention, plain Conv-GLU and pooling branch): the
``x ref`` ratios are against it, and ``vs_peers`` gives every transnext case's time, memory,
multiply-adds and GFLOP/s relative to each peer, all measured in the same run. ``--rounds``
repeats the whole set interleaved and keeps each case's fastest round (useful on a busy machine).

Layout: :mod:`.runner` (arguments, cases, subprocesses), :mod:`.case` (what runs inside one
case's process), :mod:`.report` (ratios, tables, plot).
"""

from __future__ import annotations

from .report import add_peer_ratios, add_reference_ratios, format_peer_table, format_size, format_table, plot
from .runner import MODES, add_arguments, command_line, main, parse_size, run

__all__ = [
    "MODES",
    "add_arguments",
    "add_peer_ratios",
    "add_reference_ratios",
    "command_line",
    "format_peer_table",
    "format_size",
    "format_table",
    "main",
    "parse_size",
    "plot",
    "run",
]
