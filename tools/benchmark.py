#!/usr/bin/env python
"""Run a benchmark grid (attacks x defenses x clean-split sizes x seeds) from one YAML file.

    python tools/benchmark.py --grid configs/benchmarks/image_fashionmnist.yaml
Victims are cached under runs/victims/; rows already in the CSV are skipped (resumable).
Writes results/<name>.csv, results/<name>.md (Table 1 layout) and results/<name>.png;
with step_time, also the NFT/FT seconds-per-step ratio (results/<name>_step_time.json), in fp32 and in the
computation NFT runs in by default on this device (bf16 + channels_last where bf16 is native).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.benchmark import (ablation_table, clean_cost_table, comparison_lines, defense_label, grid_layout,
                            grids_writing, in_grid_order, is_clean_model_row, markdown_table, plot_results,
                            prepare_victims, read_rows, run_grid, step_time_lines, step_time_report, time_ratio_lines)
from core.cli import run_main
from core.config import load_config, load_yaml
from core.pipeline import get_or_train_victim, load_bundle
from core.rundir import read_json, write_json
from core.utils import pick_device
from modalities import get_modality


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, help="grid YAML (configs/benchmarks/...)")
    p.add_argument("--out", help="CSV path (default: the grid's output)")
    p.add_argument("--runs", help="also keep each purified run dir under this folder")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override keys of every cell's config, e.g. train.epochs=2")
    p.add_argument("--no-step-time", action="store_true", help="skip the NFT/FT step-time measurement")
    p.add_argument("--victims-only", action="store_true",
                   help="train (or load) each victim of the grid once, write results/<name>_victims.csv, run no defense")
    p.add_argument("--cached-only", action="store_true",
                   help="run defenses only on victims already cached; skip (and list) the others")
    p.add_argument("--attack", dest="attacks", nargs="+", metavar="LABEL",
                   help="run only these attacks' cells (e.g. one process per attack on a core each; they share the CSV)")
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown/plot from the CSV; run no cell")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    grid = load_yaml(args.grid)
    name = grid.get("name") or Path(args.grid).stem
    out_csv = Path(args.out or grid.get("output") or f"results/{name}.csv")
    layout = grid_layout(grid, args.grid)   # checked before any cell runs, not after an hour of them
    overrides = load_config(None, args.overrides)
    if args.victims_only:
        victims_csv = out_csv.with_name(f"{out_csv.stem}_victims.csv")
        prepare_victims(grid, get_modality, out_csv=victims_csv, show_progress=not args.no_progress, overrides=overrides)
        print(f"wrote {victims_csv}")
        return
    if args.report_only:
        rows = read_rows(out_csv)
        if not rows:
            raise ValueError(f"{out_csv} has no rows yet; run the grid without --report-only first")
    else:
        rows = run_grid(grid, get_modality, out_csv=out_csv, runs_root=args.runs, show_progress=not args.no_progress,
                        overrides=overrides, cached_only=args.cached_only, attacks=args.attacks)
    rows = in_grid_order(rows, grid, overrides)
    md = out_csv.with_suffix(".md")
    sizes = sorted({int(r["clean_per_class"]) for r in rows}, reverse=True)
    measured = "ACC" if all(is_clean_model_row(r) for r in rows) else "ASR/ACC"   # a grid of clean models: no ASR
    text = [f"# {name}\n", f"{measured} (%) after each defense; rows from `{out_csv}`; "
            "reproduce with " + ", ".join(f"`python tools/benchmark.py --grid {g}`"
                                          for g in grids_writing(out_csv, args.grid)) + ".\n"]
    for n in sizes:
        at_n = [r for r in rows if int(r["clean_per_class"]) == n and not is_clean_model_row(r)]
        if at_n:
            text.append(f"\n## {n} clean samples per class\n\n" + markdown_table(at_n) + time_ratio_lines(at_n)
                        + comparison_lines(at_n))
        clean = [r for r in rows if int(r["clean_per_class"]) == n and is_clean_model_row(r)]
        if clean:   # a grid with defend_clean_models: true
            text.append(f"\n## On models with no backdoor, {n} clean samples per class\n\nACC (%) after each defense: "
                        "with nothing to remove, its drop is what the defense costs.\n\n" + clean_cost_table(clean)
                        + time_ratio_lines(clean))
    if layout == "ablation":
        text.append("\n## Ablation (the paper's Table 7 layout)\n\nASR/ACC after per attack; the average ASR / ACC "
                    "after minus the default's (its most common split size) over the attacks both ran.\n\n"
                    + ablation_table(rows, defense_label(grid["grid"]["defense"][0])))
    step_json = out_csv.with_name(f"{name}_step_time.json")
    t = None
    if grid.get("step_time") and not args.no_step_time and not args.report_only:
        base = load_config(grid["base"], args.overrides)
        adapter = get_modality(base.get("modality", "image"))
        bundle = load_bundle(adapter, base)
        victim, _ = get_or_train_victim(adapter, base, show_progress=not args.no_progress, bundle=bundle)
        clean, _ = adapter.clean_split(bundle, int((base.get("defense") or {}).get("clean_per_class", 60)), 0)
        t = step_time_report(adapter, victim, clean, device=pick_device(base.get("device")))
        write_json(step_json, t)
    elif grid.get("step_time") and step_json.exists():
        t = read_json(step_json)   # a report without a new measurement keeps the last one
    if t is not None:
        text.append(step_time_lines(t))
    md.write_text("".join(text))
    plot_results(rows, out_csv.with_suffix(".png"))
    print("".join(text))


if __name__ == "__main__":
    run_main(main)
