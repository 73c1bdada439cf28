"""Benchmark grids: datasets x attacks x defenses x clean-split sizes x seeds from one YAML file.

Victims are trained once and cached; finished cells (rows already in the CSV) are skipped,
so a grid is resumable. Each cell records ACC/ASR/RA before and after, DER and the wall
seconds of the defense alone. Outputs: CSV rows, a Markdown table in the paper's Table 1
layout (ASR/ACC per cell, an average-drop row), and plots. With ``defend_clean_models: true`` the
defenses also run on the grid's clean models (attack ``none``): a table of what each costs with nothing
to remove.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from .adapter import Modality
from .config import deep_merge, load_yaml
from .defenses.base import DefenseContext
from .pipeline import (SPEED_KEYS, attack_from_run, cached_victim, defense_speed, get_or_train_victim, load_bundle,
                       make_defense, purify_to_run, speed_label, speed_options)
from .registry import DEFENSES
from .rundir import write_csv
from .utils import autocast as autocast_ctx
from .utils import pick_device, progress, to_memory_format

try:
    import fcntl
except ImportError:   # Windows: no advisory file locks; run one process per results file there
    fcntl = None

COLUMNS = ["dataset", "model", "attack", "defense", "clean_per_class", "seed", "acc_before", "asr_before", "ra_before",
           "acc_after", "asr_after", "ra_after", "der", "seconds", "preset", "options", "victim", "speed"]


def defense_label(d: Dict[str, Any]) -> str:
    """``nft``, ``nft[official]``, or an explicit ``label`` from the grid file."""
    if d.get("label"):
        return str(d["label"])
    # An entry that sets a speed key gets its own label, so it is not taken for the same cell computed otherwise.
    speed = "".join(f"+{k}" for k in SPEED_KEYS if d.get(k) not in (None, False))
    return d["name"] + (f"[{d['preset']}]" if d.get("preset") else "") + speed


def read_rows(path: str | Path) -> List[Dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


@contextlib.contextmanager
def _csv_lock(path: str | Path):
    """An exclusive lock for one results file (a lock file in the temp dir, keyed by the file's absolute path).

    Why: two processes of one grid (e.g. one attack each, on a core each) append to the same CSV; each
    re-reads it under the lock before writing, so neither overwrites the other's rows.
    """
    if fcntl is None:
        yield
        return
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"nft-purify-{digest}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge_rows(out_csv: str | Path, new: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Write ``new`` into ``out_csv`` with the rows already on disk (a row of the same cell is replaced); returns all."""
    with _csv_lock(out_csv):
        mine = {_key(r) for r in new}
        rows = [r for r in read_rows(out_csv) if _key(r) not in mine] + list(new)
        write_csv(out_csv, rows, COLUMNS)
    return rows


def _key(r: Dict[str, Any]) -> tuple:
    return (str(r["dataset"]), str(r["model"]), str(r["attack"]), str(r["defense"]), str(r["clean_per_class"]),
            str(r["seed"]))


def expand_grid(grid: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One cell per (base config, attack, defense, clean_per_class, seed)."""
    g = grid.get("grid", {})
    bases = grid.get("bases") or [grid.get("base")]
    cells = []
    for base, attack, defense in itertools.product(
            bases, g.get("attack", [None]), g.get("defense", [{"name": "nft"}])):
        # A defense entry may narrow the seeds and clean-split sizes it runs at (e.g. NFT on three seeds,
        # an hour-long baseline on one).
        d = {k: v for k, v in defense.items() if k not in ("clean_per_class", "seed")}
        for seed, per in itertools.product(defense.get("seed", g.get("seed", [0])),
                                           defense.get("clean_per_class", g.get("clean_per_class", [60]))):
            cells.append({"base": base, "attack": attack, "defense": dict(d), "clean_per_class": int(per),
                          "seed": int(seed)})
    return cells


def in_grid_order(rows: Iterable[Dict[str, Any]], grid: Dict[str, Any],
                  overrides: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """``rows`` in the grid's cell order (its attacks, then defenses, then sizes and seeds, as the file lists them);
    rows of cells the grid does not name keep their order, after those. Why: processes that each run some attacks
    merge rows into the CSV as cells finish, and the tables take their row and column order from the rows."""
    index: Dict[tuple, int] = {}
    for i, cell in enumerate(expand_grid(grid)):
        index.setdefault(_key(cell_row_key(cell, cell_config(cell, overrides))), i)
    return sorted(rows, key=lambda r: index.get(_key(r), len(index)))


def cell_config(cell: Dict[str, Any], overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The victim config of one grid cell: its base file with the cell's attack merged in."""
    cfg = load_yaml(cell["base"]) if isinstance(cell["base"], (str, Path)) else dict(cell["base"] or {})
    if cell["attack"] is not None:
        attack = dict(cell["attack"])
        # An attack that needs its own architecture (trojannet's merged host) names it in its entry.
        if "model" in attack:
            cfg["model"] = deep_merge(cfg.get("model") or {}, attack.pop("model"))
        base_attack = cfg.get("attack") or {}
        if attack.get("name") == base_attack.get("name"):
            cfg["attack"] = deep_merge(base_attack, attack)
        else:  # a different attack keeps only the shared threat-model keys of the base
            cfg["attack"] = {**{k: v for k, v in base_attack.items() if k in ("target", "rate", "mode")}, **attack}
    cfg = deep_merge(cfg, overrides or {})
    cfg["seed"] = cfg.get("seed", 0)
    return cfg


def without_labels(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` without the grid's display labels, which must not enter the victim's cache key."""
    cfg = {k: v for k, v in cfg.items() if k != "label"}
    cfg["attack"] = {k: v for k, v in (cfg.get("attack") or {}).items() if k != "label"}
    return cfg


def grid_files_writing(out_csv: str | Path, folder: str | Path) -> List[str]:
    """Every grid file in ``folder`` whose rows go to ``out_csv`` (several grids may share one CSV); maybe none."""
    found = []
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            g = load_yaml(path)
        except Exception:  # a broken neighbour does not stop the report
            continue
        if Path(str(g.get("output") or f"results/{g.get('name') or path.stem}.csv")) == Path(out_csv):
            found.append(str(path))
    return found


def grids_writing(out_csv: str | Path, this_grid: str | Path) -> List[str]:
    """The grid files next to ``this_grid`` that write ``out_csv`` (``this_grid`` itself if none says so)."""
    return grid_files_writing(out_csv, Path(this_grid).parent) or [str(this_grid)]


def cell_row_key(cell: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The columns that identify a cell's CSV row (``cfg``: :func:`cell_config` of the cell)."""
    return {"dataset": cfg["data"]["name"], "model": cfg["model"]["arch"], "attack": attack_label_of(cfg),
            "defense": defense_label(cell["defense"]), "clean_per_class": cell["clean_per_class"], "seed": cell["seed"]}


def attack_label_of(cfg: Dict[str, Any]) -> str:
    attack = cfg.get("attack") or {}
    label = attack.get("label") or attack.get("name", "none")
    if attack.get("mode") == "all2all" and "label" not in attack:
        label += "-all"
    return str(label)


VICTIM_COLUMNS = ["dataset", "model", "attack", "seed", "acc", "asr", "ra", "victim"]


def prepare_victims(grid: Dict[str, Any], get_adapter: Callable[[str], Modality], *,
                    out_csv: Optional[str | Path] = None, victims_root: str | Path = "runs/victims",
                    show_progress: bool = True, overrides: Optional[Dict[str, Any]] = None,
                    echo: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Train (or load from the cache) every victim of the grid, once each; one row per victim.

    A victim's ACC/ASR/RA are those measured when it was trained (``metrics.json``); a clean
    model (attack ``none``) has ACC only. Rows go to ``out_csv`` after each victim, merged with the
    rows already there (several grids share one victims file): a row of the same dataset, model,
    attack label and seed is replaced, every other row is kept.
    """
    rows: List[Dict[str, Any]] = []
    seen = set()
    for cell in expand_grid(grid):
        cfg = cell_config(cell, overrides)
        label = attack_label_of(cfg)
        key = (str(cell["base"]), label, cfg["seed"])
        if key in seen:
            continue
        seen.add(key)
        cfg = without_labels(cfg)
        adapter = get_adapter(cfg.get("modality", "image"))
        bundle = load_bundle(adapter, cfg)
        echo(f"[victim] {cfg['data']['name']} {cfg['model']['arch']} {label}")
        _model, vrun = get_or_train_victim(adapter, cfg, victims_root, show_progress=show_progress, bundle=bundle)
        m = vrun.metrics()
        backdoored = "before" in m
        got = m.get("before") or m.get("clean") or {}
        row = {"dataset": cfg["data"]["name"], "model": cfg["model"]["arch"], "attack": label, "seed": cfg["seed"],
               "acc": got.get("acc"), "asr": got.get("asr", "") if backdoored else "",
               "ra": got.get("ra", "") if backdoored else "", "victim": vrun.path.name}
        echo(f"  ACC {row['acc']:.2f}" + (f"  ASR {row['asr']:.2f}" if row["asr"] != "" else ""))
        rows.append(row)
        if out_csv:
            mine = {_victim_key(r) for r in rows}
            with _csv_lock(out_csv):   # re-read: another process may have added its victims meanwhile
                kept = [r for r in read_rows(out_csv) if _victim_key(r) not in mine]
                write_csv(out_csv, kept + rows, VICTIM_COLUMNS)
    return rows


def _victim_key(r: Dict[str, Any]) -> tuple:
    return tuple(str(r[k]) for k in ("dataset", "model", "attack", "seed"))


def run_grid(grid: Dict[str, Any], get_adapter: Callable[[str], Modality], *, out_csv: str | Path,
             victims_root: str | Path = "runs/victims", runs_root: Optional[str | Path] = None,
             show_progress: bool = True, overrides: Optional[Dict[str, Any]] = None,
             echo: Callable[[str], None] = print, cached_only: bool = False,
             attacks: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
    """Run every cell not yet in ``out_csv``; ``cached_only`` skips cells whose victim is not trained yet.

    ``attacks``: run only the cells of these attack labels (one process per attack can share a grid and its
    CSV: each row is merged into the file as it is now on disk). A clean model (attack ``none``) gets defense cells
    only where the grid says ``defend_clean_models: true`` (its rows: ACC and seconds, no ASR). Returns every row the
    CSV then holds.
    """
    if not isinstance(grid.get("defend_clean_models", False), bool):
        raise ValueError(f"defend_clean_models is true or false (true: run each defense on the grid's clean models, "
                         f"attack none, too), got {grid['defend_clean_models']!r}")
    done = {_key(r) for r in read_rows(out_csv)}
    device = pick_device(grid.get("device"))
    cells = expand_grid(grid)
    if attacks is not None:
        wanted = set(attacks)
        labels = [cell_row_key(c, cell_config(c, overrides))["attack"] for c in cells]
        if wanted - set(labels):
            raise ValueError(f"--attack {sorted(wanted - set(labels))} is not an attack label of this grid; choose "
                             f"from {sorted(set(labels))}")
        cells = [c for c, label in zip(cells, labels) if label in wanted]
    mine: List[Dict[str, Any]] = []
    for cell in cells:
        cfg = cell_config(cell, overrides)
        d = dict(cell["defense"])
        row_key = cell_row_key(cell, cfg)
        label, attack_label = row_key["defense"], row_key["attack"]
        if _key(row_key) in done:
            continue
        clean_model = (cfg.get("attack") or {}).get("name", "none") == "none"
        if clean_model and not grid.get("defend_clean_models"):
            continue  # a clean reference model: --victims-only trains it; there is no backdoor to remove
        adapter = get_adapter(cfg.get("modality", "image"))
        cfg = without_labels(cfg)
        if cached_only and cached_victim(cfg, victims_root) is None:
            echo(f"[skip] {attack_label}: victim not trained yet (run with --victims-only first)")
            continue
        bundle = load_bundle(adapter, cfg)
        echo(f"[victim] {row_key['dataset']} {row_key['model']} {attack_label}")
        model, vrun = get_or_train_victim(adapter, cfg, victims_root, show_progress=show_progress, bundle=bundle)
        attack = attack_from_run(adapter, vrun, bundle.num_classes)
        before = vrun.metrics().get("before") or adapter.evaluate(model, bundle.test, attack, device=device)
        # Speed keys: the grid entry's, else the base config's defense section's (how, not what, it computes).
        base_defense = cfg.get("defense") or {}
        defense = {"name": d["name"], "preset": d.get("preset"), "options": d.get("options") or {},
                   "clean_per_class": cell["clean_per_class"],
                   # unset stays unset (None), so the modality's measured default (adapter.defense_speed) applies
                   **{k: d.get(k, base_defense.get(k)) for k in SPEED_KEYS}}
        out = None
        if runs_root:
            out = Path(runs_root) / f"{row_key['dataset']}-{attack_label}-{label}-n{cell['clean_per_class']}-s{cell['seed']}"
        res = purify_to_run(adapter, model, bundle, defense, out, model_spec=cfg["model"], seed=cell["seed"],
                            device=device, attack=attack, source=str(vrun.path), show_progress=show_progress,
                            before=before, plots=bool(out))
        res.pop("model", None)
        res.pop("defense_info", None)
        metrics = {k: res.get(k) for k in ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after",
                                           "der", "seconds")}
        if clean_model:   # no trigger: ASR, RA and DER do not exist (blank, not NaN or a DER of accuracy alone)
            metrics.update({k: "" for k in ("asr_before", "ra_before", "asr_after", "ra_after", "der")})
        row = {**row_key, **metrics,
               "preset": d.get("preset") or "", "options": ";".join(f"{k}={v}" for k, v in (d.get("options") or {}).items()),
               "victim": vrun.path.name, "speed": res.get("speed", "")}
        asr = "" if clean_model else f"ASR {row['asr_before']:.2f} -> {row['asr_after']:.2f}  "
        echo(f"  {label:18s} n={cell['clean_per_class']:<3d} ACC {row['acc_before']:.2f} -> {row['acc_after']:.2f}  "
             f"{asr}{row['seconds']:.1f}s")
        mine.append(row)
        done.add(_key(row))
        merge_rows(out_csv, mine)  # after every cell: a killed grid resumes where it stopped
    return read_rows(out_csv)


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _median(values: List[float]) -> float:
    """The middle value; of an even count the upper middle one (a measured time, not an average of two)."""
    v = sorted(values)
    return v[len(v) // 2]


def cell_summaries(rows: Iterable[Dict[str, Any]]) -> Dict[tuple, Dict[str, Dict[str, float]]]:
    """(dataset, model, attack) -> defense -> its rows' means (ASR / ACC before and after, both drops), the ASR's
    range and the row count (seeds); keys and defenses in the order the rows first name them."""
    groups: Dict[tuple, Dict[str, List[Dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"], r["attack"]), {}).setdefault(r["defense"], []).append(r)
    out: Dict[tuple, Dict[str, Dict[str, float]]] = {}
    for key, by_def in groups.items():
        for d, rs in by_def.items():
            m = {c: sum(_f(x[c]) for x in rs) / len(rs) for c in ("asr_before", "acc_before", "asr_after", "acc_after")}
            asrs, accs = [_f(x["asr_after"]) for x in rs], [_f(x["acc_after"]) for x in rs]
            out.setdefault(key, {})[d] = {"asr_before": m["asr_before"], "acc_before": m["acc_before"],
                                          "asr": m["asr_after"], "acc": m["acc_after"],
                                          "asr_drop": m["asr_before"] - m["asr_after"],
                                          "acc_drop": m["acc_before"] - m["acc_after"],
                                          "asr_min": min(asrs), "asr_max": max(asrs),
                                          "acc_min": min(accs), "acc_max": max(accs), "n": len(rs)}
    return out


def _table_head(head: List[str]) -> List[str]:
    """A Markdown table's header line and rule."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _defense_cells(by_def: Dict[str, Dict[str, float]], defenses: List[str],
                   fmt: Callable[[Dict[str, float]], str]) -> List[str]:
    """One table row's cell per defense: ``fmt`` of its summary, "-" where it did not run."""
    return [fmt(by_def[d]) if d in by_def else "-" for d in defenses]


def _range(c: Dict[str, float], metric: str) -> str:
    """" [lowest-highest]" of a cell's ``metric`` ("asr" / "acc") over several rows (seeds); "" for one row."""
    return f" [{c[metric + '_min']:.2f}-{c[metric + '_max']:.2f}]" if c["n"] > 1 else ""


def _median_seconds_line(rows: List[Dict[str, Any]], defenses: List[str]) -> str:
    """A table's "median seconds" row: each defense's median wall seconds over its rows ("-" without rows)."""
    secs = [[_f(r["seconds"]) for r in rows if r["defense"] == d] for d in defenses]
    return "| " + " | ".join(["median seconds", "", ""] + [f"{_median(v):.1f}" if v else "-" for v in secs]) + " |"


def markdown_table(rows: Iterable[Dict[str, Any]], clean_per_class: Optional[int] = None) -> str:
    """Paper Table 1 layout: one row per (dataset, attack), ASR/ACC per defense, an average-drop row."""
    rows = [r for r in rows if clean_per_class is None or int(r["clean_per_class"]) == clean_per_class]
    defenses = list(dict.fromkeys(r["defense"] for r in rows))   # in the order the rows first name them
    groups = cell_summaries(rows)
    head = ["dataset", "attack", "no defense"] + defenses
    lines = _table_head(head)
    drops: Dict[str, Dict[tuple, tuple]] = {d: {} for d in defenses}
    for key, by_def in groups.items():
        ds, _model, atk = key
        first = next(iter(by_def.values()))
        # Over several seeds the mean hides how far one run can be from it: show the ASR's range.
        cells = [ds, atk, f"{first['asr_before']:.2f}/{first['acc_before']:.2f}"] + _defense_cells(
            by_def, defenses, lambda c: f"{c['asr']:.2f}/{c['acc']:.2f}" + _range(c, "asr"))
        for d, c in by_def.items():
            # Against the victim's column, so the average row is that column minus this one.
            drops[d][key] = (first["asr_before"] - c["asr"], first["acc_before"] - c["acc"])
        lines.append("| " + " | ".join(cells) + " |")

    def mean_drop(vals: List[tuple]) -> str:
        return f"{sum(a for a, _ in vals) / len(vals):.2f}/{sum(b for _, b in vals) / len(vals):.2f}" if vals else "-"

    # Averages compare defenses only over the same victims; where columns cover different
    # victims, each column's own average (n victims) follows on a separate row.
    common = [k for k in groups if all(k in drops[d] for d in defenses)]
    label = "avg drop (ASR/ACC)" if len(common) == len(groups) else \
        f"avg drop (ASR/ACC), the {len(common)} victims every defense ran"
    lines.append("| " + " | ".join([label, "", ""] + [mean_drop([drops[d][k] for k in common]) for d in defenses]) + " |")
    if len(common) < len(groups):
        own = [f"{mean_drop(list(drops[d].values()))} ({len(drops[d])})" for d in defenses]
        lines.append("| " + " | ".join(["avg drop over its own victims (n)", "", ""] + own) + " |")
    lines.append(_median_seconds_line(rows, defenses))
    if any(c["n"] > 1 for by_def in groups.values() for c in by_def.values()):
        lines.append("\nA cell with several rows (seeds) shows their mean ASR/ACC and [lowest-highest ASR].")
    return "\n".join(lines) + "\n"


def is_clean_model_row(r: Dict[str, Any]) -> bool:
    """A defense run on a model with no backdoor (attack ``none``): its row has no ASR."""
    return math.isnan(_f(r.get("asr_before")))


def clean_cost_table(rows: Iterable[Dict[str, Any]]) -> str:
    """What each defense costs models with no backdoor: one row per clean model, ACC after per defense (over several
    seeds its mean and [lowest-highest]), then each defense's average ACC drop and median seconds.

    Why: with nothing to remove, a defense's accuracy drop is its floor, the price of running it at all; a target
    on the average ACC drop over backdoored victims is read against it.
    """
    rows = [r for r in rows if is_clean_model_row(r)]
    defenses = list(dict.fromkeys(r["defense"] for r in rows))   # in the order the rows first name them
    groups = cell_summaries(rows)
    head = ["dataset", "model", "no defense (ACC)"] + defenses
    lines = _table_head(head)
    drops: Dict[str, List[float]] = {d: [] for d in defenses}
    for (ds, model, atk), by_def in groups.items():
        first = next(iter(by_def.values()))
        cells = [ds, model if atk == "none" else f"{model} ({atk})", f"{first['acc_before']:.2f}"] + _defense_cells(
            by_def, defenses, lambda c: f"{c['acc']:.2f}" + _range(c, "acc"))
        for d, c in by_def.items():
            drops[d].append(c["acc_drop"])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| " + " | ".join(["avg ACC drop", "", ""] + [f"{sum(v) / len(v):.2f}" if v else "-"
                                                              for v in drops.values()]) + " |")
    lines.append(_median_seconds_line(rows, defenses))
    if any(c["n"] > 1 for by_def in groups.values() for c in by_def.values()):
        lines.append("\nA cell with several rows (seeds) shows their mean ACC and [lowest-highest].")
    return "\n".join(lines) + "\n"


# How a grid's Markdown is laid out: "table1" (the paper's Table 1, always written) and, with "ablation", also the
# paper's Table 7 (one row per variant).
LAYOUTS = ("table1", "ablation")


def grid_layout(grid: Dict[str, Any], source: str = "grid") -> str:
    """The grid's ``layout`` (default "table1"); an unknown one fails here, before any cell runs."""
    layout = grid.get("layout", "table1")
    if layout not in LAYOUTS:
        raise ValueError(f"{source}: layout is one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def ablation_table(rows: Iterable[Dict[str, Any]], reference: str = "nft") -> str:
    """The paper's Table 7 layout: one row per variant (defense label at a clean-split size), ASR/ACC after per attack.

    The ``reference`` label's rows come first (by split size), then every other label in the order the rows first
    name it. Per variant: its average drops over the attacks it ran, and its average ASR / ACC after minus the
    reference's at the most common split size over the attacks both ran (negative ASR, positive ACC: the variant
    is better), so a change is read off against the default, not against the victim. Columns are attack labels:
    one dataset and model per table (an ablation varies the defense, not the victim's setting).
    """
    rows = list(rows)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    labels = list(dict.fromkeys(r["defense"] for r in rows))
    # A variant is a (label, split size) pair: summarised as one "defense" of each attack's cell.
    cells: Dict[tuple, Dict[str, Dict[str, float]]] = {}
    for key, by_variant in cell_summaries({**r, "defense": (r["defense"], int(r["clean_per_class"]))}
                                          for r in rows).items():
        for v, c in by_variant.items():
            cells.setdefault(v, {})[key[2]] = c
    variants = sorted(cells, key=lambda v: (v[0] != reference, labels.index(v[0]), v[1]))
    sizes = [int(r["clean_per_class"]) for r in rows]
    ref = cells.get((reference, max(set(sizes), key=lambda n: (sizes.count(n), n)))) if rows else None
    head = ["variant", "clean / class"] + attacks + ["avg drop (ASR/ACC)", "vs " + reference + " (ASR/ACC)",
                                                     "median seconds"]
    lines = _table_head(head)
    for d, n in variants:
        own = cells[(d, n)]
        line = [d, str(n)] + [f"{own[a]['asr']:.2f}/{own[a]['acc']:.2f}" if a in own else "-" for a in attacks]
        k = len(own)
        count = "" if k == len(attacks) else f" ({k})"
        line.append(f"{sum(c['asr_drop'] for c in own.values()) / k:.2f}/"
                    f"{sum(c['acc_drop'] for c in own.values()) / k:.2f}{count}")
        both = [a for a in own if ref is not None and a in ref]
        if both and own is not ref:
            dasr = sum(own[a]["asr"] - ref[a]["asr"] for a in both) / len(both)
            dacc = sum(own[a]["acc"] - ref[a]["acc"] for a in both) / len(both)
            line.append(f"{dasr:+.2f}/{dacc:+.2f}")
        else:
            line.append("-")
        secs = [_f(r["seconds"]) for r in rows if r["defense"] == d and int(r["clean_per_class"]) == n]
        line.append(f"{_median(secs):.1f}")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


# Issue 4's time target: NFT's wall time against the median of these defenses' (the paper's comparison set).
TIME_BASELINES = ("anp", "i-bau", "awm", "ft-sam", "rnp")


def _base_name(label: str) -> str:
    """A row's defense name without its preset or speed suffix: ``nft[generic]``, ``anp+autocast`` -> nft, anp."""
    return str(label).split("[")[0].split("+")[0]


def is_nft_label(label: str) -> bool:
    """Whether a row's label is NFT run some way: ``nft``, a preset / speed suffix, or a grid's variant label
    ``nft-...`` (``nft-no-reg``, ``nft-fp32``). Such a column is compared with the baselines, never counted as one."""
    label = str(label)
    return _base_name(label) == "nft" or label.startswith("nft-")


def time_ratio(rows: Iterable[Dict[str, Any]], defense: str = "nft",
               against: Iterable[str] = TIME_BASELINES) -> Optional[Dict[str, Any]]:
    """``defense``'s median wall seconds over its cells, against the median of ``against``'s medians.

    ``defense`` is a row label (``nft``, ``nft[generic]``, ...); ``against`` are names, each matching its rows
    whatever their preset or speed suffix. None unless both sides have rows. Returns the medians, the ratio and
    which of ``against`` are slower / not slower than ``defense`` (each by its own median).
    """
    rows = list(rows)
    own_secs = [_f(r["seconds"]) for r in rows if r["defense"] == defense]
    base = {}
    for name in against:
        secs = [_f(r["seconds"]) for r in rows if _base_name(r["defense"]) == name]
        if secs:
            base[name] = _median(secs)
    if not own_secs or not base:
        return None
    own, ref = _median(own_secs), _median(list(base.values()))
    return {"defense": defense, "seconds": own, "against": base, "median_against": ref, "ratio": own / ref,
            "slower": sorted(d for d, m in base.items() if m > own),
            "not_slower": sorted(d for d, m in base.items() if m <= own)}


def time_ratio_lines(rows: Iterable[Dict[str, Any]]) -> str:
    """Markdown lines stating :func:`time_ratio` for every NFT column (empty when none applies)."""
    rows = list(rows)
    labels = sorted({r["defense"] for r in rows if is_nft_label(r["defense"])})
    out = []
    for label in labels:
        t = time_ratio(rows, label)
        if t is None:
            continue
        names = ", ".join(f"{d} {m:.1f}" for d, m in t["against"].items())
        slower, not_slower = ", ".join(t["slower"]), ", ".join(t["not_slower"])
        verdict = (f"faster than {slower}, not faster than {not_slower}" if slower and not_slower else
                   f"faster than each of them ({slower})" if slower else f"faster than none of them ({not_slower})")
        out.append(f"\n{label} / median({names}) = {t['seconds']:.1f} / {t['median_against']:.1f} = "
                   f"**{t['ratio']:.3f}** (median seconds per defense over its cells); {label} is {verdict}.\n")
    return "".join(out)


def comparison(rows: Iterable[Dict[str, Any]], defense: str = "nft", margin: float = 1.0) -> List[Dict[str, Any]]:
    """``defense`` against every other defense, each over the victims both ran.

    Per baseline: the victims compared, both average drops, whether ``defense`` is better on each (a larger ASR
    drop, a smaller ACC drop: Issue 4's targets), and the attacks where the baseline is better by more than
    ``margin`` points (lower ASR after, or higher ACC after), with by how much, largest first.
    """
    rows = list(rows)
    cells = cell_summaries(rows)
    others = sorted({d for by_def in cells.values() for d in by_def if d != defense})
    out = []
    for d in others:
        keys = [k for k, by_def in cells.items() if defense in by_def and d in by_def]
        if not keys:
            continue
        n = len(keys)
        own, base = [cells[k][defense] for k in keys], [cells[k][d] for k in keys]
        asr_own, acc_own = sum(c["asr_drop"] for c in own) / n, sum(c["acc_drop"] for c in own) / n
        asr_base, acc_base = sum(c["asr_drop"] for c in base) / n, sum(c["acc_drop"] for c in base) / n
        by_asr = [(k[2], o["asr"] - b["asr"]) for k, o, b in zip(keys, own, base)]   # > 0: the baseline's is lower
        by_acc = [(k[2], b["acc"] - o["acc"]) for k, o, b in zip(keys, own, base)]   # > 0: the baseline's is higher
        lower_asr = sorted((t for t in by_asr if t[1] > margin), key=lambda t: -t[1])
        higher_acc = sorted((t for t in by_acc if t[1] > margin), key=lambda t: -t[1])
        out.append({"defense": defense, "baseline": d, "victims": n, "asr_drop": asr_own, "acc_drop": acc_own,
                    "baseline_asr_drop": asr_base, "baseline_acc_drop": acc_base,
                    "better_asr": asr_own > asr_base, "better_acc": acc_own < acc_base,
                    "baseline_lower_asr": lower_asr, "baseline_higher_acc": higher_acc,
                    "by_seed": seed_paired_advantage(rows, defense, d, keys)})
    return out


def seed_paired_advantage(rows: Iterable[Dict[str, Any]], defense: str, baseline: str,
                          keys: Iterable[tuple]) -> List[tuple]:
    """Per seed that both defenses ran on every victim in ``keys`` ((dataset, model, attack)): (seed, how much
    larger ``defense``'s average ASR drop is, how much smaller its average ACC drop is); > 0: ``defense`` better.

    Why: a seed changes the clean split and the defense's own randomness on the same victims, so each seed pairs the
    two defenses on the same data; whether one is ahead on every seed says more than a difference of two means.
    """
    keys = list(keys)
    # cell_summaries with each (defense, seed) summarised as a defense of its own
    per_seed = cell_summaries({**r, "defense": (r["defense"], str(r.get("seed", 0)))} for r in rows
                              if r["defense"] in (defense, baseline))
    out = []
    for seed in sorted({s for by in per_seed.values() for _, s in by}, key=int):
        pairs = [(per_seed.get(k, {}).get((defense, seed)), per_seed.get(k, {}).get((baseline, seed))) for k in keys]
        if keys and all(a and b for a, b in pairs):
            out.append((seed, sum(a["asr_drop"] - b["asr_drop"] for a, b in pairs) / len(keys),
                        sum(b["acc_drop"] - a["acc_drop"] for a, b in pairs) / len(keys)))
    return out


def _seed_summary(by_seed: List[tuple]) -> str:
    """'ASR ahead on 1 of 3 (-2.10 to +1.20); ACC ahead on 3 of 3 (+0.10 to +0.50)' for :func:`seed_paired_advantage`."""
    parts = []
    for name, i in (("ASR", 1), ("ACC", 2)):
        v = [t[i] for t in by_seed]
        parts.append(f"{name} ahead on {sum(x > 0 for x in v)} of {len(v)} ({min(v):+.2f} to {max(v):+.2f})")
    return "; ".join(parts)


def _attacks_by(pairs: List[tuple]) -> str:
    return ", ".join(f"{a} {v:.1f}" for a, v in pairs) or "-"


def comparison_lines(rows: Iterable[Dict[str, Any]], margin: float = 1.0) -> str:
    """A Markdown table per NFT column: :func:`comparison` against each baseline (empty when none applies)."""
    rows = list(rows)
    labels = sorted({r["defense"] for r in rows if is_nft_label(r["defense"])})
    out = []
    for label in labels:
        cmp = [c for c in comparison(rows, label, margin) if not is_nft_label(c["baseline"])]
        if not cmp:
            continue
        # Where both ran several seeds on the same victims, a column says on how many seeds the label is ahead.
        seeded = any(len(c["by_seed"]) > 1 for c in cmp)
        out.append(f"\n{label} against each baseline, over the victims both ran (average drops ASR/ACC; better = "
                   f"a larger ASR drop, a smaller ACC drop); where a baseline is better by more than {margin:g} "
                   f"point, the attack and by how much"
                   + (f"; per seed both ran on all those victims, on how many {label} is ahead and its advantage "
                      f"in average drop (lowest to highest; > 0: {label} better)" if seeded else "") + ":\n\n"
                   f"| baseline | victims | {label} | baseline | ASR drop better | ACC drop better | "
                   f"baseline's ASR lower on | baseline's ACC higher on |" + (" by seed |" if seeded else "")
                   + "\n|---|---|---|---|---|---|---|---|" + ("---|" if seeded else "") + "\n")
        for c in cmp:
            seeds = (f" {_seed_summary(c['by_seed']) if len(c['by_seed']) > 1 else '-'} |" if seeded else "")
            out.append(f"| {c['baseline']} | {c['victims']} | {c['asr_drop']:.2f}/{c['acc_drop']:.2f} | "
                       f"{c['baseline_asr_drop']:.2f}/{c['baseline_acc_drop']:.2f} | "
                       f"{'yes' if c['better_asr'] else 'no, by %.2f' % (c['baseline_asr_drop'] - c['asr_drop'])} | "
                       f"{'yes' if c['better_acc'] else 'no, by %.2f' % (c['acc_drop'] - c['baseline_acc_drop'])} | "
                       f"{_attacks_by(c['baseline_lower_asr'])} | {_attacks_by(c['baseline_higher_acc'])} |{seeds}\n")
    return "".join(out)


def plot_results(rows: List[Dict[str, Any]], path: str | Path) -> Path:
    """ASR vs ACC after defense (one marker per defense) and median runtime bars."""
    from .plots import _plt, save_figure

    plt = _plt()
    defenses = sorted({r["defense"] for r in rows})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    backdoored = [r for r in rows if not is_clean_model_row(r)]
    for d in defenses:
        if backdoored:
            rs = [r for r in backdoored if r["defense"] == d]
            a1.scatter([_f(r["acc_after"]) for r in rs], [_f(r["asr_after"]) for r in rs], label=d, s=28)
        else:   # models with no backdoor: no ASR, so each defense's ACC drop per run
            drops = [_f(r["acc_before"]) - _f(r["acc_after"]) for r in rows if r["defense"] == d]
            a1.scatter([d] * len(drops), drops, label=d, s=28)
    if backdoored:
        a1.set_xlabel("clean ACC after (%)"); a1.set_ylabel("ASR after (%)"); a1.set_title("lower right is better")
    else:
        a1.set_ylabel("ACC drop on a model with no backdoor (points)"); a1.set_title("lower is better")
        a1.tick_params(axis="x", rotation=45, labelsize=7)
    a1.legend(fontsize=7)
    a2.bar(defenses, [_median([_f(r["seconds"]) for r in rows if r["defense"] == d]) for d in defenses])
    a2.set_ylabel("median wall seconds of the defense"); a2.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def step_time_report(adapter: Modality, model: torch.nn.Module, clean: Any, *, device: Optional[torch.device] = None,
                     **kwargs: Any) -> Dict[str, Any]:
    """:func:`step_times` in fp32 (the top-level keys) and, where the modality's NFT runs otherwise by default
    (bf16 / channels_last on this device), both steps again computed that way under ``at_nft_speed``.

    Why both: the fp32 pair is comparable across machines and sessions; the second is the computation a
    default NFT run uses (FT timed in it too, so the ratio still compares the same kernels).
    """
    device = device or pick_device(None)
    report: Dict[str, Any] = step_times(adapter, model, clean, device=device, **kwargs)
    speed = speed_options(defense_speed(adapter, {"name": "nft"}), device)
    if any(speed.values()):
        fast = step_times(adapter, model, clean, device=device, autocast=speed["autocast"],
                          channels_last=speed["channels_last"], **kwargs)
        report["at_nft_speed"] = {"speed": speed_label(speed), **fast}
    return report


def step_time_lines(t: Dict[str, Any]) -> str:
    """The Markdown section of a step-time report (either shape: with or without ``at_nft_speed``)."""
    text = (f"\n## Step time (same batch of {t['batch_size']}, same victim)\n\n"
            f"NFT {t['nft_step_s'] * 1000:.1f} ms/step, FT {t['ft_step_s'] * 1000:.1f} ms/step, "
            f"ratio NFT/FT = {t['ratio']:.3f} ({t['num_masks']} masks vs {t['num_weights']} weights; both fp32)\n")
    fast = t.get("at_nft_speed")
    if fast:
        text += (f"\nIn NFT's default computation here ({fast['speed']}, FT computed the same way): "
                 f"NFT {fast['nft_step_s'] * 1000:.1f} ms/step, FT {fast['ft_step_s'] * 1000:.1f} ms/step, "
                 f"ratio NFT/FT = {fast['ratio']:.3f}\n")
    return text


def step_times(adapter: Modality, model: torch.nn.Module, clean: Any, *, nft_options: Optional[Dict[str, Any]] = None,
               batch_size: int = 128, repeats: int = 60, warmup: int = 5, device: Optional[torch.device] = None,
               seed: int = 0, autocast: bool = False, channels_last: bool = False, rounds: int = 5) -> Dict[str, float]:
    """Seconds per optimiser step of NFT (masks only) and of FT (all weights), same batch, same model.

    ``repeats`` steps of each in ``rounds`` interleaved rounds (FT, NFT, FT, NFT, ...); each step time is the
    median of its rounds, so one round slowed by the machine moves neither (runs still differ: docs/results.md).

    NFT's step includes everything its default does per step (augmentation, MixUp, the
    universal perturbation's input gradient, clipping); FT's is a plain SGD step. ``autocast`` /
    ``channels_last``: both steps compute that way (as ``defense.autocast`` / ``defense.channels_last``).
    """
    import copy

    from .nft import MaskTrainer

    device = device or pick_device(None)
    g = torch.Generator().manual_seed(seed)
    batch = next(iter(adapter.loader(clean, batch_size, generator=g, replacement_samples=batch_size)))
    x0, y0 = adapter.to_device(batch[0], device), batch[1].to(device)
    cfg = make_defense(adapter, "nft", nft_options).cfg  # as the defense runs on this modality

    ft_model = copy.deepcopy(model).to(device).train()
    opt = torch.optim.SGD(ft_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def ft_step() -> None:
        x = to_memory_format(ft_model, adapter.augment(x0, "weak", g), channels_last)
        with autocast_ctx(device, autocast):
            out = adapter.forward(ft_model, x)
        loss = adapter.criterion(out, y0)  # outside autocast, as core.defenses.finetune computes it
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    trainer = MaskTrainer(copy.deepcopy(model).to(device), adapter, cfg, x0[:8], 60, device, g,
                          channels_last=channels_last, use_autocast=autocast)
    counter = iter(range(10 ** 9))

    def nft_step() -> None:
        trainer.step(x0, y0, next(counter))

    def timed(fn: Callable[[], None], n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    for _ in range(warmup):
        ft_step()
        nft_step()
    rounds = max(int(rounds), 1)
    per_round = max(int(repeats) // rounds, 1)
    ft_times, nft_times = [], []
    for _ in range(rounds):   # interleaved: drift in machine load reaches both alike
        ft_times.append(timed(ft_step, per_round))
        nft_times.append(timed(nft_step, per_round))
    ft_s, nft_s = _median(ft_times), _median(nft_times)
    return {"ft_step_s": ft_s, "nft_step_s": nft_s, "ratio": nft_s / ft_s, "batch_size": batch_size, "rounds": rounds,
            "num_masks": trainer.masks.num_masks, "num_weights": sum(p.numel() for p in model.parameters())}
