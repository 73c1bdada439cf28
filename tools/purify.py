#!/usr/bin/env python
"""Purify a model with a defense (NFT by default) using only a few clean samples per class.

From a victim run dir:
    python tools/purify.py --run runs/fmnist_badnets --defense nft --clean-per-class 60
From outside weights (safetensors / weights-only torch file / TorchScript):
    python tools/purify.py --modality image --weights model.safetensors --arch preact_resnet18_narrow \
        --set model.in_channels=1 data.name=fashion-mnist --clean-per-class 60
The defense needs no knowledge of the trigger; a victim run dir's attack spec is used
only to report ASR before and after.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.cli import add_config_args, config_from, print_table, run_main
from core.config import deep_merge
from core.nft import describe_seconds, describe_suspects
from core.pipeline import attack_from_run, load_bundle, load_outside_model, load_run_model, purify_to_run
from core.rundir import RunDir
from core.utils import pick_device, seed_everything
from modalities import get_modality


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="victim run dir (model.safetensors + run.json)")
    src.add_argument("--weights", help="outside weights file; needs --arch and the data spec")
    p.add_argument("--modality", help="modality name (default: the run dir's, or the config's, or image)")
    p.add_argument("--arch", help="architecture name for --weights")
    p.add_argument("--num-classes", type=int, help="classes of the outside model (default: the dataset's)")
    p.add_argument("--defense", help="defense name (nft, ft, ...; default nft)")
    p.add_argument("--preset", help="defense preset, e.g. official")
    p.add_argument("--clean-per-class", type=int, help="clean samples per class for the defender (default 60)")
    p.add_argument("--seed", type=int, help="seed of the clean split and the defense")
    p.add_argument("--out", help="purified run dir (default: <run>-<defense>)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: auto)")
    args = p.parse_args()
    cfg = config_from(args)

    attack = None
    if args.run:
        run = RunDir(args.run)
        info = run.info()
        cfg = deep_merge({k: v for k, v in info["config"].items() if k != "defense"}, cfg)
        adapter = get_modality(args.modality or info["modality"])
        model, _ = load_run_model(adapter, run)
        bundle = load_bundle(adapter, cfg)
        attack = attack_from_run(adapter, run, bundle.num_classes)
        source = str(run.path)
    else:
        if not args.arch and not (cfg.get("model") or {}).get("arch"):
            raise ValueError("--weights needs --arch NAME (the architecture the weights belong to)")
        adapter = get_modality(args.modality or cfg.get("modality", "image"))
        if args.arch:
            cfg = deep_merge(cfg, {"model": {"arch": args.arch}})
        bundle = load_bundle(adapter, cfg)
        model = load_outside_model(adapter, args.weights, cfg["model"], args.num_classes or bundle.num_classes)
        source = str(args.weights)
    defense = dict(cfg.get("defense") or {})
    if args.defense:
        if args.defense != defense.get("name"):
            defense["options"] = {}
        defense["name"] = args.defense
    defense.setdefault("name", "nft")
    if args.preset:
        defense["preset"] = args.preset
    if args.clean_per_class is not None:
        defense["clean_per_class"] = args.clean_per_class
    seed = args.seed if args.seed is not None else int(cfg.get("seed", 0))
    seed_everything(seed)
    stem = args.run.rstrip("/") if args.run else str(Path(args.weights).with_suffix(""))
    out = args.out or f"{stem}-{defense['name']}"
    device = pick_device(args.device or cfg.get("device"))
    row = purify_to_run(adapter, model, bundle, defense, out, model_spec=cfg["model"], seed=seed, device=device,
                        attack=attack, source=source, show_progress=not args.no_progress)
    print_table([row], ["defense", "preset", "clean_per_class", "acc_before", "asr_before", "acc_after", "asr_after",
                        "ra_after", "seconds", "speed", "run_dir"])
    info = row.pop("defense_info")
    for line in (describe_suspects(info), describe_seconds(info)):
        if line:
            print(line)


if __name__ == "__main__":
    run_main(main)
