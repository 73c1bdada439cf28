#!/usr/bin/env python
"""NFT step by step on a victim: test ACC/ASR, clean-split accuracy and mask statistics every N steps.

    python tools/trace_nft.py --run runs/victims/VICTIM --every 50 --set defense.options.recover_steps=400
    python tools/trace_nft.py --run runs/victims/VICTIM --interpolate 0.5 0.8 0.9

Writes <out>.csv and <out>.png (ACC and ASR against steps; the interpolation as a second panel). A diagnostic for research:
the recovery early stop is not applied, and test numbers must never choose NFT's settings.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from core.cli import add_config_args, config_from, print_table, run_main
from core.config import deep_merge
from core.nft import trace_nft
from core.pipeline import attack_from_run, load_bundle, load_run_model, make_defense
from core.plots import plot_trace
from core.rundir import RunDir, write_csv
from core.utils import pick_device, seed_everything
from modalities import get_modality


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--run", required=True, help="victim run dir")
    p.add_argument("--preset", help="NFT preset, e.g. official")
    p.add_argument("--clean-per-class", type=int, default=60)
    p.add_argument("--every", type=int, default=50, help="evaluate every N steps (default 50)")
    p.add_argument("--test-subset", type=int, default=2000, help="evenly spaced test samples (0 = all)")
    p.add_argument("--interpolate", type=float, nargs="*", default=[],
                   help="after the last step, also evaluate masks 1 - t (1 - m) for these t")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output stem (default: results/trace_<victim>)")
    p.add_argument("--device", help="cpu, cuda (default: auto)")
    args = p.parse_args()
    run = RunDir(args.run)
    info = run.info()
    cfg = deep_merge({k: v for k, v in info["config"].items() if k != "defense"}, config_from(args))
    adapter = get_modality(info["modality"])
    model, _ = load_run_model(adapter, run)
    bundle = load_bundle(adapter, cfg)
    attack = attack_from_run(adapter, run, bundle.num_classes)
    clean, _ = adapter.clean_split(bundle, args.clean_per_class, args.seed)
    test = bundle.test
    if args.test_subset and args.test_subset < len(test):
        idx = torch.arange(0, len(test), len(test) // args.test_subset)[:args.test_subset]  # every k-th
        test = test.select(idx) if hasattr(test, "select") else torch.utils.data.Subset(test, idx.tolist())
    options = ((cfg.get("defense") or {}).get("options")) or {}
    nft_cfg = make_defense(adapter, "nft", options, args.preset).cfg  # with the modality's NFT defaults
    device = pick_device(args.device or cfg.get("device"))
    seed_everything(args.seed)
    rows = trace_nft(model, adapter, clean, nft_cfg, lambda m: adapter.evaluate(m, test, attack, device=device),
                     every=args.every, clean_per_class=args.clean_per_class, device=device, seed=args.seed,
                     interpolate=args.interpolate, show_progress=not args.no_progress)
    out = Path(args.out or f"results/trace_{run.path.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["step", "phase", "t", "acc", "asr", "ra", "clean_split_acc", "mask_mean", "mask_frac_below", "seconds"]
    write_csv(out.with_suffix(".csv"), rows, cols)
    plot_trace(rows, out.with_suffix(".png"), title=run.path.name)
    print_table(rows, cols)
    print(f"wrote {out.with_suffix('.csv')} and .png")


if __name__ == "__main__":
    run_main(main)
