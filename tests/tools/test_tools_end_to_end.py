"""The thin tools on digits: attack.py -> purify.py (run dir and outside weights) -> evaluate.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.utils import bf16_is_fast

ROOT = Path(__file__).resolve().parents[2]
CFG = "configs/image/digits_badnets.yaml"


def tool(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "NFT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "victim"
    tool("tools/attack.py", "--config", CFG, "--out", str(out), "--no-progress")
    return out


def test_attack_writes_a_safe_run_dir(victim_dir):
    assert (victim_dir / "model.safetensors").is_file()
    info = json.loads((victim_dir / "run.json").read_text())
    assert info["modality"] == "image" and info["attack"]["name"] == "badnets" and info["n_poisoned"] > 0
    m = json.loads((victim_dir / "metrics.json").read_text())["before"]
    assert m["asr"] > 90 and m["acc"] > 85


def test_purify_and_evaluate_run_dir(victim_dir, tmp_path):
    out = tmp_path / "nft"
    proc = tool("tools/purify.py", "--run", str(victim_dir), "--defense", "nft", "--clean-per-class", "10",
                "--set", "defense.options.steps=100", "--out", str(out), "--no-progress")
    # The image NFT default computes in bf16 + channels_last where bf16 is native, fp32 + channels_last elsewhere.
    bf16 = bf16_is_fast(torch.device("cpu"))
    assert "nft" in proc.stdout and ("bf16" if bf16 else "fp32") + "+channels_last" in proc.stdout
    # 100 clean samples: the image default's targeted search runs in two families, and the tool says what it
    # ranked first in the family it kept, and the other family's pick.
    assert "targeted search (L" in proc.stdout and "is reached most easily" in proc.stdout
    assert "[L-inf ball 0.2: class" in proc.stdout or "[L1 ball 12: class" in proc.stdout
    assert (out / "masks.safetensors").is_file() and (out / "log.csv").is_file() and (out / "plots" / "masks.png").is_file()
    info = json.loads((out / "run.json").read_text())
    assert info["kind"] == "purified" and len(info["clean_indices"]) == 100
    assert info["speed"] == {"autocast": bf16, "channels_last": True}
    proc = tool("tools/evaluate.py", "--run", str(out), "--attack-from", str(victim_dir))
    assert "asr" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"before", "after"} <= set(metrics) and metrics["evaluated_autocast"] is False
    tool("tools/evaluate.py", "--run", str(out), "--attack-from", str(victim_dir), "--autocast", "true")
    bf16 = json.loads((out / "metrics.json").read_text())
    assert bf16["evaluated_autocast"] is True and abs(bf16["after"]["acc"] - metrics["after"]["acc"]) < 3


def test_trace_nft_writes_a_trajectory(victim_dir, tmp_path):
    import csv

    out = tmp_path / "trace"
    tool("tools/trace_nft.py", "--run", str(victim_dir), "--clean-per-class", "5", "--every", "10",
         "--set", "defense.options.steps=20", "defense.options.recover_steps=10", "defense.options.batch_size=32",
         "--interpolate", "0", "--test-subset", "200", "--out", str(out), "--no-progress")
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["phase"] for r in rows] == ["main", "main", "recovery", "interpolated"]
    # t = 0 is the victim itself: the backdoor is fully there.
    victim_asr = json.loads((victim_dir / "metrics.json").read_text())["before"]["asr"]
    assert float(rows[-1]["asr"]) > 0.8 * victim_asr
    assert out.with_suffix(".png").is_file()


def test_purify_outside_weights(victim_dir, tmp_path):
    # An outside state dict saved as a weights-only torch file, with a DataParallel prefix.
    from safetensors.torch import load_file

    state = {f"module.{k}": v for k, v in load_file(str(victim_dir / "model.safetensors")).items()}
    path = tmp_path / "outside.pth"
    torch.save(state, path)
    out = tmp_path / "outside-ft"
    tool("tools/purify.py", "--weights", str(path), "--config", CFG, "--defense", "ft", "--clean-per-class", "5",
         "--set", "defense.options.steps=20", "--out", str(out), "--no-progress")
    assert (out / "model.safetensors").is_file()


def test_bad_input_gives_one_line_error(tmp_path):
    proc = tool("tools/purify.py", "--run", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2 and "not a run dir" in proc.stderr and "Traceback" not in proc.stderr
    proc = tool("tools/attack.py", "--config", CFG, "--set", "attack.name=nope", check=False)
    assert proc.returncode == 2 and "unknown image attack 'nope'" in proc.stderr
    proc = tool("tools/purify.py", "--weights", str(tmp_path / "w.pth"), check=False)
    assert proc.returncode == 2 and "--arch" in proc.stderr


def test_train_step_precision_benchmark_prints_both_times_and_the_ratio():
    out = tool("benchmarks/train_step_precision.py", "--steps", "1").stdout
    fp32, bf16, ratio = (float(out.split(key)[1].split()[0]) for key in ("fp32 ", "bf16 ", "bf16/fp32 "))
    assert fp32 > 0 and bf16 > 0 and ratio == pytest.approx(bf16 / fp32, abs=0.02)


def test_benchmark_report_only_rewrites_the_table_and_keeps_the_step_time(tmp_path):
    # --report-only runs no cell and measures nothing: the table comes from the CSV, and the step-time
    # section from the last measurement's JSON (it was dropped from the report before session 13).
    cols = ("dataset,model,attack,defense,clean_per_class,seed,acc_before,asr_before,ra_before,acc_after,asr_after,"
            "ra_after,der,seconds")
    rows = ["digits,small_cnn,badnets,nft,10,0,96.0,97.0,3.0,93.0,20.0,80.0,70.0,3.0",
            "digits,small_cnn,badnets,nft,10,1,96.0,97.0,3.0,92.0,30.0,70.0,65.0,3.5"]
    csv = tmp_path / "grid.csv"
    csv.write_text(cols + "\n" + "\n".join(rows) + "\n")
    (tmp_path / "grid_step_time.json").write_text(json.dumps(
        {"batch_size": 128, "ft_step_s": 0.2, "nft_step_s": 0.15, "num_masks": 80, "num_weights": 9000, "ratio": 0.75}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"name: grid\nbase: {CFG}\noutput: {csv}\nstep_time: true\n"
                    "grid: {attack: [{name: badnets}], defense: [{name: nft}], clean_per_class: [10], seed: [0, 1]}\n")
    tool("tools/benchmark.py", "--grid", str(grid), "--report-only")
    md = (tmp_path / "grid.md").read_text()
    assert "| digits | badnets | 97.00/96.00 | 25.00/92.50 [20.00-30.00] |" in md
    assert "NFT 150.0 ms/step, FT 200.0 ms/step, ratio NFT/FT = 0.750" in md
    assert (tmp_path / "grid.png").exists()
