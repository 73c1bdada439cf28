"""The benchmark grid on digits: victims cached, rows resumable, Table 1 markdown, step timing."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.benchmark import (ablation_table, attack_label_of, cell_config, clean_cost_table, comparison, comparison_lines, expand_grid,
                            grid_layout, in_grid_order, is_nft_label, markdown_table, prepare_victims, read_rows,
                            run_grid, step_time_lines, step_time_report, step_times, time_ratio, time_ratio_lines)
from modalities import get_modality


def test_grid_runs_resumes_and_writes_table(tmp_path):
    grid = {"base": "configs/image/digits_badnets.yaml",
            "grid": {"attack": [{"name": "badnets", "patch_size": 2}],
                     "defense": [{"name": "ft", "options": {"steps": 20}}, {"name": "nft", "options": {"steps": 20}}],
                     "clean_per_class": [5], "seed": [0]}}
    assert len(expand_grid(grid)) == 2
    out = tmp_path / "r.csv"
    lines = []
    rows = run_grid(grid, get_modality, out_csv=out, victims_root=tmp_path / "victims", show_progress=False,
                    echo=lines.append)
    assert len(rows) == 2 and len(read_rows(out)) == 2
    assert {r["defense"] for r in rows} == {"ft", "nft"}
    for col in ("dataset", "model", "attack", "defense", "clean_per_class", "seed", "acc_before", "asr_before",
                "acc_after", "asr_after", "ra_after", "seconds"):
        assert col in read_rows(out)[0]
    # second run: every cell is already in the CSV, nothing is recomputed, the victim is reused
    lines.clear()
    again = run_grid(grid, get_modality, out_csv=out, victims_root=tmp_path / "victims", show_progress=False,
                     echo=lines.append)
    assert len(again) == 2 and lines == []
    md = markdown_table(read_rows(out), 5)
    assert "| digits | badnets |" in md and "avg drop (ASR/ACC)" in md and md.count("/") >= 6


def test_average_row_compares_defenses_on_the_same_victims():
    def row(atk, d, asr, acc):
        return {"dataset": "x", "model": "m", "attack": atk, "defense": d, "clean_per_class": 60, "seconds": 1,
                "asr_before": 100, "acc_before": 90, "asr_after": asr, "acc_after": acc}
    rows = [row("a", "nft", 0, 88), row("a", "ft", 50, 89), row("b", "nft", 100, 80)]
    md = markdown_table(rows, 60)
    assert "| avg drop (ASR/ACC), the 1 victims every defense ran |  |  | 100.00/2.00 | 50.00/1.00 |" in md
    assert "| avg drop over its own victims (n) |  |  | 50.00/6.00 (2) | 50.00/1.00 (1) |" in md
    assert "[" not in md   # one row per cell: no range


def test_cells_over_seeds_show_the_asr_range():
    def row(d, seed, asr, acc):
        return {"dataset": "x", "model": "m", "attack": "a", "defense": d, "clean_per_class": 60, "seconds": 1,
                "seed": seed, "asr_before": 100, "acc_before": 90, "asr_after": asr, "acc_after": acc}
    md = markdown_table([row("nft", 0, 2, 88), row("nft", 1, 10, 86), row("ft", 0, 50, 89)], 60)
    assert "| x | a | 100.00/90.00 | 6.00/87.00 [2.00-10.00] | 50.00/89.00 |" in md
    assert "[lowest-highest ASR]" in md


def test_time_ratio_against_the_median_of_the_baselines():
    def row(d, s):
        return {"defense": d, "seconds": s}
    rows = [row("nft", 30), row("nft", 50), row("rnp", 10), row("i-bau", 40), row("awm", 200), row("awm", 100),
            row("ft-sam", 300), row("anp", 900), row("ft", 1)]
    t = time_ratio(rows)
    # medians (upper middle of an even count, as the table's): nft 50, awm 200; of rnp 10, i-bau 40, awm 200,
    # ft-sam 300, anp 900 the median is 200; ft is not in the comparison set
    assert t["seconds"] == 50 and t["median_against"] == 200 and t["ratio"] == 0.25
    assert t["slower"] == ["anp", "awm", "ft-sam"] and t["not_slower"] == ["i-bau", "rnp"]
    lines = time_ratio_lines(rows)
    assert "nft / median(" in lines and "= 50.0 / 200.0 = **0.250**" in lines and "not faster than i-bau, rnp" in lines
    assert time_ratio([row("nft", 1), row("ft", 2)]) is None and time_ratio_lines([row("ft", 2)]) == ""
    # every NFT column gets its line; baselines match by name whatever their preset or speed suffix
    fast = [row("nft+autocast+channels_last", 20), row("nft[generic]", 40), row("anp+autocast+channels_last", 100)]
    lines = time_ratio_lines(fast)
    assert "nft+autocast+channels_last / median(anp 100.0) = 20.0 / 100.0 = **0.200**" in lines
    assert "nft[generic] / median(anp 100.0) = 40.0 / 100.0" in lines
    # faster than every baseline, or than none: said so (not "not faster than any")
    assert "nft+autocast+channels_last is faster than each of them (anp)." in lines
    assert "nft[generic] is faster than each of them (anp)." in lines
    assert "nft is faster than none of them (rnp)." in time_ratio_lines([row("nft", 50), row("rnp", 10)])


def test_comparison_states_where_a_baseline_beats_nft_and_by_how_much():
    def row(atk, d, asr, acc, seed=0):
        return {"dataset": "x", "model": "m", "attack": atk, "defense": d, "clean_per_class": 60, "seconds": 1,
                "seed": seed, "asr_before": 100, "acc_before": 90, "asr_after": asr, "acc_after": acc}
    rows = [row("a", "nft", 2, 88), row("a", "nft", 4, 86, seed=1), row("b", "nft", 60, 89),
            row("a", "fst", 0, 87), row("b", "fst", 5, 85),
            row("a", "ft", 50, 89.5), row("c", "ft", 0, 90)]
    by = {c["baseline"]: c for c in comparison(rows)}
    # nft's cell a is the mean of its two seeds (3 / 87); ft is compared on victim a only
    assert by["fst"]["victims"] == 2 and by["ft"]["victims"] == 1
    assert by["fst"]["asr_drop"] == pytest.approx(68.5) and by["fst"]["baseline_asr_drop"] == pytest.approx(97.5)
    assert by["fst"]["acc_drop"] == pytest.approx(2.0) and by["fst"]["baseline_acc_drop"] == pytest.approx(4.0)
    assert not by["fst"]["better_asr"] and by["fst"]["better_acc"]
    assert by["fst"]["baseline_lower_asr"] == [("b", 55.0), ("a", 3.0)] and by["fst"]["baseline_higher_acc"] == []
    assert by["ft"]["better_asr"] and not by["ft"]["better_acc"] and by["ft"]["baseline_higher_acc"] == [("a", 2.5)]
    md = comparison_lines(rows)
    assert "| fst | 2 | 68.50/2.00 | 97.50/4.00 | no, by 29.00 | yes | b 55.0, a 3.0 | - |" in md
    assert "| ft | 1 | 97.00/3.00 | 50.00/0.50 | yes | no, by 2.50 | - | a 2.5 |" in md
    assert comparison_lines([row("a", "ft", 1, 1)]) == ""
    # an NFT variant (a grid's nft-... label) gets its own comparison and is never listed as a baseline
    md = comparison_lines(rows + [row("a", "nft-fast", 1, 87)])
    assert "nft-fast against each baseline" in md and "\n| nft-fast |" not in md
    assert "| fst | 1 | 99.00/3.00 | 100.00/3.00 | no, by 1.00 | no, by 0.00 | - | - |" in md
    assert is_nft_label("nft-no-reg") and is_nft_label("nft[official]") and not is_nft_label("ft-sam")


def test_comparison_pairs_the_defenses_seed_by_seed():
    def row(atk, d, seed, asr, acc):
        return {"dataset": "x", "model": "m", "attack": atk, "defense": d, "clean_per_class": 60, "seconds": 1,
                "seed": seed, "asr_before": 100, "acc_before": 90, "asr_after": asr, "acc_after": acc}
    rows = [row("a", "nft", 0, 10, 88), row("b", "nft", 0, 30, 86), row("a", "fst", 0, 0, 87), row("b", "fst", 0, 20, 87),
            row("a", "nft", 1, 0, 89), row("b", "nft", 1, 10, 88), row("a", "fst", 1, 5, 85), row("b", "fst", 1, 25, 87),
            # seed 2: fst did not run victim b, so that seed pairs nothing
            row("a", "nft", 2, 0, 89), row("b", "nft", 2, 0, 89), row("a", "fst", 2, 0, 89),
            row("a", "ft", 0, 50, 89)]
    by = {c["baseline"]: c for c in comparison(rows)}
    # seed 0: nft drops 80 / 3, fst 90 / 3 -> ASR -10, ACC 0; seed 1: nft 95 / 1.5, fst 85 / 4 -> +10, +2.5
    assert by["fst"]["by_seed"] == [("0", -10.0, 0.0), ("1", 10.0, 2.5)]
    assert by["ft"]["by_seed"] == [("0", 40.0, -1.0)]
    md = comparison_lines(rows)
    assert "| baseline's ACC higher on | by seed |" in md
    assert "ASR ahead on 1 of 2 (-10.00 to +10.00); ACC ahead on 1 of 2 (+0.00 to +2.50) |" in md
    assert "| ft | 1 | 96.67/1.33 | 50.00/1.00 | yes | no, by 0.33 | - | - | - |" in md   # one seed: nothing to pair
    # one seed everywhere: no seed column
    assert "by seed" not in comparison_lines([r for r in rows if r["seed"] == 0])


def test_ablation_table_has_a_row_per_variant_and_reads_each_against_the_default():
    def row(atk, d, n, asr, acc, secs=10):
        return {"dataset": "x", "model": "m", "attack": atk, "defense": d, "clean_per_class": n, "seconds": secs,
                "seed": 0, "asr_before": 100, "acc_before": 90, "asr_after": asr, "acc_after": acc}
    rows = [row("a", "nft-no-reg", 60, 10, 80), row("a", "nft", 60, 2, 88), row("b", "nft", 60, 4, 86),
            row("a", "nft", 10, 6, 82, secs=5), row("b", "nft-no-reg", 60, 20, 84), row("a", "nft-fast", 60, 3, 87)]
    md = ablation_table(rows).splitlines()
    assert md[0] == ("| variant | clean / class | a | b | avg drop (ASR/ACC) | vs nft (ASR/ACC) | median seconds |")
    # the default first, by split size; then the other variants in the order the rows name them
    assert [line.split(" | ")[0] + "|" + line.split(" | ")[1] for line in md[2:]] == \
        ["| nft|10", "| nft|60", "| nft-no-reg|60", "| nft-fast|60"]
    # the reference is nft at 60 (its most common size): 2/88 on a, 4/86 on b
    assert md[2] == "| nft | 10 | 6.00/82.00 | - | 94.00/8.00 (1) | +4.00/-6.00 | 5.0 |"
    assert md[3] == "| nft | 60 | 2.00/88.00 | 4.00/86.00 | 97.00/3.00 | - | 10.0 |"
    assert md[4] == "| nft-no-reg | 60 | 10.00/80.00 | 20.00/84.00 | 85.00/8.00 | +12.00/-5.00 | 10.0 |"
    assert md[5] == "| nft-fast | 60 | 3.00/87.00 | - | 97.00/3.00 (1) | +1.00/-1.00 | 10.0 |"
    assert grid_layout({}) == "table1" and grid_layout({"layout": "ablation"}) == "ablation"
    with pytest.raises(ValueError, match=r"g.yaml: layout is one of table1, ablation, got 'table7'"):
        grid_layout({"layout": "table7"}, "g.yaml")


def test_rows_from_processes_that_finished_in_any_order_are_tabled_in_the_grid_order():
    grid = {"base": "configs/image/digits_badnets.yaml",
            "grid": {"attack": [{"name": "badnets"}, {"name": "blend"}], "defense": [{"name": "nft"}, {"name": "ft"}],
                     "clean_per_class": [5], "seed": [0]}}

    def row(atk, d):
        return {"dataset": "digits", "model": "small_cnn", "attack": atk, "defense": d, "clean_per_class": "5",
                "seed": "0"}
    finished = [row("blend", "ft"), row("x", "nft"), row("badnets", "ft"), row("blend", "nft"), row("badnets", "nft")]
    ordered = [(r["attack"], r["defense"]) for r in in_grid_order(finished, grid)]
    # a row the grid does not name (carried from another file) keeps its place after the grid's cells
    assert ordered == [("badnets", "nft"), ("badnets", "ft"), ("blend", "nft"), ("blend", "ft"), ("x", "nft")]


def test_step_time_ratio_is_measured(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 5, 0)
    t = step_times(image_adapter, small_model, clean, batch_size=32, repeats=3, warmup=1)
    assert t["nft_step_s"] > 0 and t["ft_step_s"] > 0 and t["ratio"] == t["nft_step_s"] / t["ft_step_s"]
    assert t["num_masks"] < t["num_weights"]
    fast = step_times(image_adapter, small_model, clean, batch_size=32, repeats=2, warmup=1, autocast=True,
                      channels_last=True)
    assert fast["nft_step_s"] > 0 and fast["ft_step_s"] > 0


def test_step_time_report_also_times_nfts_default_computation(digits, image_adapter, small_model):
    # the image modality's NFT runs with channels_last (and bf16 where native): both steps are timed that way too
    clean, _ = image_adapter.clean_split(digits, 5, 0)
    t = step_time_report(image_adapter, small_model, clean, batch_size=32, repeats=2, warmup=1, rounds=2)
    fast = t["at_nft_speed"]
    assert fast["speed"].endswith("+channels_last") and fast["ratio"] == fast["nft_step_s"] / fast["ft_step_s"]
    assert t["ratio"] == t["nft_step_s"] / t["ft_step_s"]
    lines = step_time_lines(t)
    assert f"ratio NFT/FT = {t['ratio']:.3f}" in lines and f"({fast['speed']}, FT computed the same way)" in lines
    old = {k: v for k, v in t.items() if k != "at_nft_speed"}   # a file written before the second timing
    assert "default computation" not in step_time_lines(old)


def test_shipped_grid_file_expands():
    grid = yaml.safe_load(open("configs/benchmarks/image_fashionmnist.yaml"))
    cells = expand_grid(grid)
    assert len(cells) == 2 * (2 + 2 + 2 + 1)  # nft, ft, nft[generic] at 60 and 1 per class; official at 60


def test_a_defense_entry_narrows_its_seeds_and_split_sizes():
    grid = {"base": "configs/image/digits_badnets.yaml",
            "grid": {"attack": [{"name": "badnets"}], "seed": [0],
                     "defense": [{"name": "nft", "seed": [0, 1, 2]}, {"name": "anp", "clean_per_class": [1]}]}}
    cells = [(c["defense"]["name"], c["seed"], c["clean_per_class"]) for c in expand_grid(grid)]
    assert cells == [("nft", 0, 60), ("nft", 1, 60), ("nft", 2, 60), ("anp", 0, 1)]
    assert all("seed" not in c["defense"] and "clean_per_class" not in c["defense"] for c in expand_grid(grid))
    cmp = expand_grid(yaml.safe_load(open("configs/benchmarks/image_fashionmnist_compare.yaml")))
    assert sorted({c["seed"] for c in cmp if c["defense"]["name"] != "nft"}) == [0]
    assert sorted({c["seed"] for c in cmp if c["defense"]["name"] == "nft" and "label" not in c["defense"]}) == [0, 1, 2]


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs/benchmarks").glob("*.yaml")))
def test_every_shipped_grid_names_registered_defenses_with_known_options(path):
    # A typo in a grid's options would otherwise surface only hours into a benchmark run.
    from core.registry import DEFENSES
    from core.schedule import lower_bounds

    grid = yaml.safe_load(open(path))
    assert grid_layout(grid, path) in ("table1", "ablation")   # an unknown layout raises
    cells = expand_grid(grid)
    assert cells
    for cell in cells:
        d = cell["defense"]
        defense = DEFENSES.get(d["name"])(preset=d.get("preset"), **(d.get("options") or {}))
        if "schedule" in defense.cfg:
            assert len(lower_bounds(defense.cfg["schedule"], 5, **(defense.cfg.get("schedule_params") or {}))) == 5


def test_prepare_victims_trains_each_victim_once_and_reuses_the_cache(tmp_path):
    grid = {"base": "configs/image/digits_badnets.yaml",
            "grid": {"attack": [{"name": "badnets", "patch_size": 2}, {"name": "none"}],
                     "defense": [{"name": "ft"}, {"name": "nft"}], "clean_per_class": [5, 1]}}
    lines = []
    rows = prepare_victims(grid, get_modality, out_csv=tmp_path / "v.csv", victims_root=tmp_path / "victims",
                           show_progress=False, echo=lines.append)
    assert [r["attack"] for r in rows] == ["badnets", "none"]  # 8 cells, 2 victims
    assert rows[0]["asr"] > 50 and rows[1]["asr"] == "" and rows[1]["acc"] > 80
    assert len(read_rows(tmp_path / "v.csv")) == 2 and len(list((tmp_path / "victims").iterdir())) == 2
    again = prepare_victims(grid, get_modality, victims_root=tmp_path / "victims", show_progress=False, echo=lambda _: None)
    assert [r["victim"] for r in again] == [r["victim"] for r in rows]
    # a second grid writing the same victims file keeps the other grid's rows and replaces its own
    other = {**grid, "grid": {**grid["grid"], "attack": [{"name": "none"}]}}
    prepare_victims(other, get_modality, out_csv=tmp_path / "v.csv", victims_root=tmp_path / "victims",
                    show_progress=False, echo=lambda _: None)
    assert [r["attack"] for r in read_rows(tmp_path / "v.csv")] == ["badnets", "none"]


def test_attack_entry_may_name_its_architecture():
    cell = {"base": "configs/image/fashion_mnist_badnets.yaml", "seed": 0, "clean_per_class": 60, "defense": {},
            "attack": {"name": "trojannet", "model": {"arch": "trojannet", "host": "preact_resnet18_narrow"}}}
    cfg = cell_config(cell)
    assert cfg["model"] == {"arch": "trojannet", "host": "preact_resnet18_narrow", "in_channels": 1}
    assert cfg["attack"] == {"name": "trojannet", "target": 0, "rate": 0.1, "mode": "all2one"}
    all2all = cell_config({**cell, "attack": {"name": "blend", "mode": "all2all"}})
    assert attack_label_of(all2all) == "blend-all" and attack_label_of(cfg) == "trojannet"


def test_shipped_attack_grid_covers_every_registered_image_attack():
    from modalities.image.attacks import ATTACKS

    grid = yaml.safe_load(open("configs/benchmarks/image_fashionmnist_attacks.yaml"))
    names = {a["name"] for a in grid["grid"]["attack"]}
    assert names == set(ATTACKS.names()) - {"none"}


def test_cached_only_skips_cells_without_a_trained_victim(tmp_path):
    # "none" (a clean reference model) is a victims-only entry: no defense cell runs on it
    grid = {"base": "configs/image/digits_badnets.yaml",
            "grid": {"attack": [{"name": "badnets", "patch_size": 2}, {"name": "blend"}, {"name": "none"}],
                     "defense": [{"name": "ft", "options": {"steps": 5}}], "clean_per_class": [5]}}
    one = {**grid, "grid": {**grid["grid"], "attack": grid["grid"]["attack"][:1]}}
    prepare_victims(one, get_modality, victims_root=tmp_path / "v", show_progress=False, echo=lambda _: None)
    lines = []
    rows = run_grid(grid, get_modality, out_csv=tmp_path / "r.csv", victims_root=tmp_path / "v", show_progress=False,
                    echo=lines.append, cached_only=True)
    assert [r["attack"] for r in rows] == ["badnets"]
    assert any(line.startswith("[skip] blend") for line in lines)
    assert len(list((tmp_path / "v").iterdir())) == 1  # nothing was trained


def test_clean_cost_table_gives_each_defenses_accuracy_drop_on_models_with_no_backdoor():
    def row(model, d, seed, acc_after, secs):
        return {"dataset": "x", "model": model, "attack": "none", "defense": d, "clean_per_class": 60, "seed": seed,
                "seconds": secs, "asr_before": "", "acc_before": 90, "asr_after": "", "acc_after": acc_after}
    rows = [row("m", "nft", 0, 88, 10), row("m", "nft", 1, 89, 30), row("m", "ft-sam", 0, 89.5, 20),
            row("n", "nft", 0, 87, 20), row("n", "ft-sam", 0, 90, 40),
            # a backdoored victim's row is not a clean model's: left out
            {**row("m", "nft", 0, 50, 1), "attack": "badnets", "asr_before": 99, "asr_after": 1}]
    md = clean_cost_table(rows)
    assert "| x | m | 90.00 | 88.50 [88.00-89.00] | 89.50 |" in md
    assert "| x | n | 90.00 | 87.00 | 90.00 |" in md
    assert "| avg ACC drop |  |  | 2.25 | 0.25 |" in md          # nft (1.5 + 3) / 2, ft-sam (0.5 + 0) / 2
    assert "| median seconds |  |  | 20.0 | 40.0 |" in md        # the upper middle of 10, 20, 30; of 20, 40
    assert "50.00" not in md


def test_a_grid_defends_its_clean_models_only_when_it_says_so(tmp_path):
    grid = {"base": "configs/image/digits_badnets.yaml", "defend_clean_models": True,
            "grid": {"attack": [{"name": "badnets", "patch_size": 2}, {"name": "none"}],
                     "defense": [{"name": "ft", "options": {"steps": 5}}], "clean_per_class": [5]}}
    kw = {"victims_root": tmp_path / "v", "show_progress": False, "echo": lambda _: None}
    rows = run_grid(grid, get_modality, out_csv=tmp_path / "r.csv", **kw)
    assert [r["attack"] for r in rows] == ["badnets", "none"]
    clean = rows[1]
    assert clean["asr_before"] == clean["asr_after"] == clean["ra_after"] == clean["der"] == ""   # no trigger, no DER
    assert float(clean["acc_before"]) > 80 and float(clean["seconds"]) > 0
    assert f"| avg ACC drop |  |  | {float(clean['acc_before']) - float(clean['acc_after']):.2f} |" in \
        clean_cost_table(rows)
    assert "none" not in markdown_table([r for r in rows if r["attack"] != "none"])
    # without the key the clean model stays a victims-only entry (the grids written before it keep their rows)
    off = {k: v for k, v in grid.items() if k != "defend_clean_models"}
    assert [r["attack"] for r in run_grid(off, get_modality, out_csv=tmp_path / "off.csv", **kw)] == ["badnets"]
    with pytest.raises(ValueError, match="defend_clean_models is true or false"):
        run_grid({**grid, "defend_clean_models": "yes"}, get_modality, out_csv=tmp_path / "bad.csv", **kw)


def test_one_process_per_attack_shares_the_grid_and_its_csv(tmp_path):
    from core.benchmark import merge_rows

    grid = {"base": "configs/image/digits_badnets.yaml",
            "grid": {"attack": [{"name": "badnets", "patch_size": 2}, {"name": "blend"}],
                     "defense": [{"name": "ft", "options": {"steps": 5}}], "clean_per_class": [5]}}
    out = tmp_path / "r.csv"
    kw = {"out_csv": out, "victims_root": tmp_path / "v", "show_progress": False, "echo": lambda _: None}
    first = run_grid(grid, get_modality, attacks=["blend"], **kw)
    assert [r["attack"] for r in first] == ["blend"]
    rows = run_grid(grid, get_modality, attacks=["badnets", "blend"], **kw)   # only the missing cell runs
    assert sorted(r["attack"] for r in rows) == ["badnets", "blend"] and len(read_rows(out)) == 2
    # A process merges its rows into the file as it is on disk: another's rows stay, a row of its own cell is replaced.
    other = {**rows[0], "defense": "nft", "acc_after": "1.0"}
    merge_rows(out, [other])
    again = {**rows[0], "acc_after": "2.0"}
    merged = merge_rows(out, [again])
    assert len(merged) == 3 and len(read_rows(out)) == 3
    assert [r["acc_after"] for r in read_rows(out) if r["defense"] == rows[0]["defense"]
            and r["attack"] == rows[0]["attack"]] == ["2.0"]
    with pytest.raises(ValueError, match="not an attack label of this grid"):
        run_grid(grid, get_modality, attacks=["wanet"], **kw)


def _merge_many(out, tag, n, barrier):
    from core.benchmark import merge_rows

    barrier.wait()   # both processes merge at the same time
    for i in range(n):
        merge_rows(out, [{"dataset": "d", "model": "m", "attack": tag, "defense": "nft", "clean_per_class": 60,
                          "seed": i, "acc_after": 1.0}])


def test_two_processes_merging_into_one_csv_lose_no_row(tmp_path):
    import multiprocessing

    out = tmp_path / "r.csv"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_merge_many, args=(out, tag, 150, barrier)) for tag in ("badnets", "blend")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted((r["attack"], int(r["seed"])) for r in read_rows(out)) == sorted(
        (tag, i) for tag in ("badnets", "blend") for i in range(150))
