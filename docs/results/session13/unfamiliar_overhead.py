"""Inline timing (session 13): the served forward with and without the unfamiliar-photo check.

Usage: PYTHONPATH=$PWD python docs/results/session13/unfamiliar_overhead.py FINAL_CHECKPOINT
(a checkpoint with familiarity.safetensors, e.g. the probe's finalised copy). One torch thread; median
of 3 rounds of 50 forwards per batch size, the two forms alternating.
"""
import dataclasses
import statistics
import sys
import time

import torch

from app.inference.served import forward_outputs, load_served_model

torch.set_num_threads(1)
served = load_served_model(sys.argv[1], version="x", device=torch.device("cpu"))
assert served.familiarity is not None
bare = dataclasses.replace(served, familiarity=None, taps=None)
size = served.preset.image_size
for batch in (1, 16):
    inputs = [torch.rand(3, size, size) for _ in range(batch)]
    times: dict[str, list[float]] = {"with_check": [], "without": []}
    for _round in range(3):
        for name, form in (("with_check", served), ("without", bare)):
            forward_outputs(form, inputs)
            start = time.perf_counter()
            for _ in range(50):
                forward_outputs(form, inputs)
            times[name].append((time.perf_counter() - start) / 50 * 1000)
    print(f"batch {batch}: " + ", ".join(f"{k} {statistics.median(v):.3f} ms" for k, v in times.items()))
