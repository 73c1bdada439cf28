"""NFT and FT seconds per step in fp32, fp32 + channels_last and bf16 + channels_last, measured in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/defense_precision.py [--threads 1] [--victim RUN_DIR]

The same victim, batch of 128 clean images and NFT settings (image default) in every setting, as
``defense.autocast`` / ``defense.channels_last`` run them; prints each setting's NFT and FT step time, NFT/FT
(Issue 2's <= 0.8) and the speed-up over fp32. Without ``--victim`` the demo's cached BadNets victim is used.
bf16 is fast only where ``core.utils.bf16_is_fast`` says so (printed); elsewhere it is slower.
"""
from __future__ import annotations

import argparse

import torch

from core.benchmark import step_times
from core.config import load_yaml
from core.pipeline import cached_victim, load_bundle, load_run_model
from core.rundir import RunDir
from core.utils import bf16_is_fast
from modalities import get_modality

SETTINGS = [("fp32", False, False), ("fp32+channels_last", False, True), ("bf16+channels_last", True, True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--victim", help="victim run dir (default: the demo's cached victim)")
    p.add_argument("--config", default="configs/image/fashion_mnist_badnets.yaml")
    p.add_argument("--repeats", type=int, default=60, help="steps of each, over 5 interleaved rounds")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_yaml(a.config)
    adapter = get_modality(cfg.get("modality", "image"))
    run = RunDir(a.victim) if a.victim else cached_victim(cfg)
    if run is None:
        raise SystemExit(f"no cached victim for {a.config}; train it first (make demo) or pass --victim RUN_DIR")
    model, _ = load_run_model(adapter, run)
    clean, _ = adapter.clean_split(load_bundle(adapter, cfg), 60, 0)
    device = torch.device("cpu")
    print(f"victim {run.path}, batch 128, {a.threads} thread(s), bf16_is_fast(cpu) = {bf16_is_fast(device)}")
    base = None
    for name, bf16, cl in SETTINGS:
        t = step_times(adapter, model, clean, repeats=a.repeats, device=device, autocast=bf16, channels_last=cl)
        base = base or t["nft_step_s"]
        print(f"{name:20s} NFT {t['nft_step_s'] * 1000:7.1f} ms  FT {t['ft_step_s'] * 1000:7.1f} ms  "
              f"NFT/FT {t['ratio']:.3f}  NFT fp32/this {base / t['nft_step_s']:.2f}x")


if __name__ == "__main__":
    main()
