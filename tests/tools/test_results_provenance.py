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

from core.benchmark import cell_config, cell_row_key, expand_grid, grid_files_writing, read_rows
from core.config import load_yaml

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


_CONFIGS: Dict[str, dict] = {}


def _config_of(cell: dict) -> dict:
    """:func:`cell_config`, memoised on what it depends on (a sweep grid has hundreds of cells)."""
    key = json.dumps([str(cell["base"]), cell["attack"]], sort_keys=True, default=str)
    if key not in _CONFIGS:
        _CONFIGS[key] = cell_config(cell)
    return _CONFIGS[key]


ROW_COLUMNS = ("dataset", "model", "attack", "defense", "clean_per_class", "seed")
VICTIM_COLUMNS = ("dataset", "model", "attack", "seed")


def _row_keys(grid_paths: List[str], victims: bool) -> Set[tuple]:
    """Every row key the grids write, as run_grid (or, ``victims``, prepare_victims) keys it."""
    keys = set()
    for c in (c for p in grid_paths for c in expand_grid(load_yaml(p))):
        cfg = _config_of(c)
        key = {**cell_row_key(c, cfg), "seed": cfg["seed"]} if victims else cell_row_key(c, cfg)
        keys.add(tuple(str(key[k]) for k in (VICTIM_COLUMNS if victims else ROW_COLUMNS)))
    return keys


@pytest.mark.parametrize("csv_path", sorted(str(p) for p in RESULTS.glob("*.csv")))
def test_every_results_csv_has_a_command_in_readme_and_every_row_a_cell(csv_path):
    path = Path(csv_path)
    if path.name.startswith("trace_"):   # tools/trace_nft.py --out results/<stem>
        assert f"results/{path.stem}" in README and "tools/trace_nft.py" in README, \
            f"README names no tools/trace_nft.py command writing {path}"
        return
    if path.stem.endswith("_victims"):   # tools/benchmark.py --victims-only next to a grid's output
        grids = grid_files_writing(path.with_name(path.name.replace("_victims.csv", ".csv")), GRIDS)
        assert grids, f"no grid in {GRIDS} writes {path.name.replace('_victims', '')}, whose victims file {path} is"
        victims = True
    else:
        grids = grid_files_writing(path, GRIDS)
        assert grids, f"no grid in {GRIDS} has output: {path}; rows without a grid cannot be reproduced"
        victims = False
    known = _row_keys(grids, victims)
    rows = [tuple(r[k] for k in (VICTIM_COLUMNS if victims else ROW_COLUMNS)) for r in read_rows(path)]
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
