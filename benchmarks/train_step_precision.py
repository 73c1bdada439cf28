"""Seconds per training step of the CPU benchmark model in fp32 and in bf16 autocast, and their ratio.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step_precision.py [--threads 1] [--steps 12]

One batch of 128 Fashion-MNIST-sized images, channels_last, SGD; the median of the timed steps
after two warm-up steps, fp32 and bf16 measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from core.utils import autocast, to_memory_format
from modalities import get_modality


def seconds_per_step(bf16: bool, steps: int, arch: str) -> float:
    torch.manual_seed(0)
    model = get_modality("image").build_model(arch, 10, in_channels=1).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = to_memory_format(model, torch.rand(128, 1, 28, 28), True)
    y = torch.randint(0, 10, (128,))
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        with autocast(torch.device("cpu"), bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--arch", default="preact_resnet18_narrow")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    fp32, bf16 = seconds_per_step(False, a.steps, a.arch), seconds_per_step(True, a.steps, a.arch)
    print(f"{a.arch}, batch 128, {a.threads} thread(s): fp32 {fp32:.3f} s/step, bf16 {bf16:.3f} s/step, "
          f"bf16/fp32 {bf16 / fp32:.2f}")


if __name__ == "__main__":
    main()
