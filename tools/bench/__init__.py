"""The harness behind ``tools/benchmark.py`` (measurement code only; the product never imports it).

* :mod:`tools.bench.common` -- settings, rows, timing, the tiny test models, inputs, the scripted
  answer and the correctness check.
* :mod:`tools.bench.generation` -- generation side by side with the published inference.
* :mod:`tools.bench.training` -- the training step side by side with the published recipe,
  parameter counts, DDP throughput, data loading.
* :mod:`tools.bench.real_size` -- Qwen2.5-VL-7B + SAM ViT-H with random weights on a GPU: the
  measurements behind the keyed GPU rows.
* :mod:`tools.bench.param_count` -- the published Qwen-VL configurations as data, and trainable
  parameters and optimiser memory at real size, counted on the ``meta`` device.
* :mod:`tools.bench.gpu_rows` -- the keyed GPU rows of issues 11 and 12: goals, floors, ``met``.
* :mod:`tools.bench.report` -- running the benchmarks, the report and its tables.
"""
