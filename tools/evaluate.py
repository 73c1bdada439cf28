#!/usr/bin/env python
"""ACC / ASR / RA of a run dir's model for a given attack spec; writes metrics.json.

    python tools/evaluate.py --run runs/fmnist_badnets-nft                 # the run's own attack spec
    python tools/evaluate.py --run runs/x --attack-from runs/fmnist_badnets   # another run's trigger
    python tools/evaluate.py --run runs/x --set attack.name=badnets attack.target=0
"""
from __future__ import annotations

import argparse

from core.cli import add_config_args, config_from, print_table, run_main
from core.config import deep_merge
from core.pipeline import attack_from_run, load_bundle, load_run_model, make_attack, speed_options
from core.rundir import RunDir
from core.utils import pick_device
from modalities import get_modality


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--run", required=True, help="run dir to evaluate")
    p.add_argument("--attack-from", help="take the attack (and learned trigger) from this run dir")
    p.add_argument("--device", help="cpu, cuda (default: auto)")
    p.add_argument("--autocast", choices=["false", "true", "auto"], default="false",
                   help="evaluate in bf16 autocast (auto: where bf16 is native; default fp32)")
    args = p.parse_args()
    run = RunDir(args.run)
    info = run.info()
    adapter = get_modality(info["modality"])
    cfg = config_from(args)
    base = {k: v for k, v in (info.get("config") or {}).items() if k in ("data", "seed")}
    if not base.get("data") and (info.get("data_info") or {}).get("spec"):
        base["data"] = info["data_info"]["spec"]
    cfg = deep_merge(base, cfg)
    model, _ = load_run_model(adapter, run)
    bundle = load_bundle(adapter, cfg)
    if cfg.get("attack"):
        attack = make_attack(adapter, cfg, bundle.num_classes)
    else:
        attack = attack_from_run(adapter, RunDir(args.attack_from) if args.attack_from else run, bundle.num_classes)
    device = pick_device(args.device)
    autocast = speed_options({"autocast": {"false": False, "true": True, "auto": "auto"}[args.autocast]}, device)["autocast"]
    metrics = adapter.evaluate(model, bundle.test, attack, device=device, autocast=autocast)
    old = run.metrics()
    key = "after" if info.get("kind") == "purified" else "before"
    run.write_metrics({**old, key: metrics, "evaluated_attack": attack.spec() if attack else None,
                       "evaluated_autocast": autocast})
    print_table([{"run": str(run.path), **metrics}], ["run", "acc", "asr", "ra", "n_clean", "n_poison"])


if __name__ == "__main__":
    run_main(main)
