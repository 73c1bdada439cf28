"""Every file in results/ comes from a command that README names, and every row from a cell of that command.

A row typed in by hand, a grid renamed after its rows were written, or a result whose command README does
not mention would make a table nobody can reproduce; these checks read the files only (no training).
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest
import yaml

from core.benchmark import attack_label_of, cell_config, defense_label, expand_grid, read_rows

RESULTS = Path("results")
GRIDS = Path("configs/benchmarks")


def expand_braces(text: str) -> str:
    """``a{,_b}.yaml`` -> ``a.yaml a_b.yaml`` (the shell's brace expansion, as README writes paths)."""
    pattern = re.compile(r"[^\s`'\"()]*\{[^{}\s]*,[^{}\s]*\}[^\s`'\"()]*")

    def words(token: str) -> List[str]:
        m = re.search(r"\{([^{}]*)\}", token)
        if not m:
            return [token]
        return list(itertools.chain.from_iterable(
            words(token[:m.start()] + alt + token[m.end():]) for alt in m.group(1).split(",")))

    return pattern.sub(lambda m: " ".join(words(m.group(0))), text)


def test_expand_braces():
    assert expand_braces("see `configs/x{,_seeds}.yaml` and results/t_{a,b}.{csv,png}") == (
        "see `configs/x.yaml configs/x_seeds.yaml` and results/t_a.csv results/t_a.png results/t_b.csv results/t_b.png")


README = expand_braces(Path("README.md").read_text())


def _grids() -> Dict[str, dict]:
    return {str(p): yaml.safe_load(p.read_text()) for p in sorted(GRIDS.glob("*.yaml"))}


def _writers() -> Dict[Path, List[str]]:
    """results CSV -> the grid files whose rows go there."""
    out: Dict[Path, List[str]] = {}
    for path, g in _grids().items():
        out.setdefault(Path(g.get("output") or f"results/{g['name']}.csv"), []).append(path)
    return out


WRITERS = _writers()


_VICTIMS: Dict[str, tuple] = {}


def _victim_of(cell: dict) -> tuple:
    """(dataset, model, attack label, seed) of a cell's victim; memoised (a sweep grid has hundreds of cells)."""
    key = json.dumps([str(cell["base"]), cell["attack"]], sort_keys=True, default=str)
    if key not in _VICTIMS:
        cfg = cell_config(cell)
        _VICTIMS[key] = (cfg["data"]["name"], cfg["model"]["arch"], attack_label_of(cfg), str(cfg["seed"]))
    return _VICTIMS[key]


def _cells(grid_paths: List[str]) -> List[dict]:
    return [c for p in grid_paths for c in expand_grid(yaml.safe_load(Path(p).read_text()))]


def _row_keys(grid_paths: List[str]) -> Set[tuple]:
    return {_victim_of(c)[:3] + (defense_label(c["defense"]), str(c["clean_per_class"]), str(c["seed"]))
            for c in _cells(grid_paths)}


def _victim_keys(grid_paths: List[str]) -> Set[tuple]:
    return {_victim_of(c) for c in _cells(grid_paths)}


@pytest.mark.parametrize("csv_path", sorted(str(p) for p in RESULTS.glob("*.csv")))
def test_every_results_csv_has_a_command_in_readme_and_every_row_a_cell(csv_path):
    path = Path(csv_path)
    if path.name.startswith("trace_"):   # tools/trace_nft.py --out results/<stem>
        assert f"results/{path.stem}" in README and "tools/trace_nft.py" in README, \
            f"README names no tools/trace_nft.py command writing {path}"
        return
    if path.stem.endswith("_victims"):   # tools/benchmark.py --victims-only next to a grid's output
        grids = WRITERS.get(path.with_name(path.name.replace("_victims.csv", ".csv")), [])
        assert grids, f"no grid in {GRIDS} writes {path.name.replace('_victims', '')}, whose victims file {path} is"
        known = _victim_keys(grids)
        rows = [tuple(r[k] for k in ("dataset", "model", "attack", "seed")) for r in read_rows(path)]
    else:
        grids = WRITERS.get(path, [])
        assert grids, f"no grid in {GRIDS} has output: {path}; rows without a grid cannot be reproduced"
        known = _row_keys(grids)
        rows = [tuple(r[k] for k in ("dataset", "model", "attack", "defense", "clean_per_class", "seed"))
                for r in read_rows(path)]
    assert rows, f"{path} has no rows"
    orphans = [r for r in rows if r not in known]
    assert not orphans, f"{path}: rows no cell of {grids} produces (first: {orphans[0]})"
    assert any(g in README for g in grids), f"README names none of {grids}, the commands that write {path}"


@pytest.mark.parametrize("md_path", sorted(str(p) for p in RESULTS.glob("*.md")))
def test_every_results_table_names_grid_files_that_exist(md_path):
    text = Path(md_path).read_text()
    named = re.findall(r"--grid (\S+\.yaml)", text)
    assert named, f"{md_path} says no reproduce command"
    for grid in named:
        assert Path(grid).is_file(), f"{md_path} names {grid}, which does not exist"
    assert Path(md_path).with_suffix(".csv").is_file(), f"{md_path} has no CSV next to it"
