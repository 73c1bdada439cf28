"""End-to-end regression on real data (scikit-learn digits): attack -> NFT -> evaluate.

Measured with the image default chosen on Fashion-MNIST (see README): on this 8x8 small-CNN victim
NFT lowers the BadNets ASR from 97% to 25% at 10 clean images per class, at ACC 96.0 -> 93.3 (the
core default without the image modality's settings, preset ``generic``: 49% at 94.9). Session 17's
targeted start (``adv_init: auto``) does not act here: the search's easiest class (9, loss 1.208) is
not an outlier against the target (0, 1.221), so the perturbation starts random (ASR 22.4%; with a
forced targeted start 45.8%). The issue's target (ASR < 10%) is not met and is kept as a strict
xfail so that reaching it is noticed. Session 21 (test-set diagnostic only): two channels of ``bn2`` carry the
backdoor (zeroing channel 17: ASR 20.7% at ACC 90.4; 17 and 19: 4.7% at 87.1), and NFT's masks leave them at
0.43-0.86; no single global change tried (L2 perturbation, eps 0.4, masks down to 0, lr 0.2, more perturbations,
a larger perturbed share, a forced targeted start) took all three splits below 10% (README, "Known gaps"). Session 22: the search's L1 family (12
full-scale pixels) names the target on all three splits (loss ~0 against 0.03 for the runner-up; the L-inf search ranked
9, 0 and 8 first), and NFT ends at 92.89 / 18.97, 94.44 / 19.21, 94.22 / 33.74 (L-inf only: 93.11 / 22.41, 94.89 / 38.67,
93.56 / 29.56). Phase one alone closes it (2-5%) at 86-91% accuracy; recovery re-opens it as accuracy returns, and a watch
on delta_t that stops recovery keeps 2% at 87% (README, "Known gaps").
Measured why (sessions 1-6, generic default): on this victim much of what lowers the ASR is the BN running statistics left by training-mode mask tuning, not the
masks. Without BN recalibration the generic default reaches 44% (Blend: 0.5%, at ACC 82); the
official preset's Blend removal (ASR 3.7%) returns to 85% once its statistics are recalibrated on
clean data.
"""
from __future__ import annotations

import pytest

from core.config import load_config
from core.defenses.base import DefenseContext
from core.pipeline import attack_from_run, run_defense, train_victim


@pytest.fixture(scope="module")
def digits_victim(tmp_path_factory, image_adapter):
    cfg = load_config("configs/image/digits_badnets.yaml")
    model, run, bundle = train_victim(image_adapter, cfg, tmp_path_factory.mktemp("v") / "victim", show_progress=False)
    attack = attack_from_run(image_adapter, run, bundle.num_classes)
    clean, _ = image_adapter.clean_split(bundle, 10, seed=0)
    return model, bundle, attack, clean, run.metrics()["before"]


def _purify(adapter, victim, **opts):
    model, bundle, attack, clean, before = victim
    res, _ = run_defense(adapter, model, clean, "nft", opts, DefenseContext(clean_per_class=10, show_progress=False))
    return before, adapter.evaluate(res.model, bundle.test, attack)


def test_victim_is_backdoored(digits_victim):
    before = digits_victim[4]
    assert before["asr"] >= 90 and before["acc"] >= 90


def test_nft_weakens_backdoor_and_keeps_accuracy(digits_victim, image_adapter):
    before, after = _purify(image_adapter, digits_victim)
    assert after["asr"] <= before["asr"] - 50, after   # 97 -> 22 measured (session 17), 97 -> 19 (session 22)
    assert after["acc"] >= before["acc"] - 5, after


def test_nft_default_beats_official_settings(digits_victim, image_adapter):
    _, default = _purify(image_adapter, digits_victim)
    model, bundle, attack, clean, _ = digits_victim
    res, _ = run_defense(image_adapter, model, clean, "nft", {}, DefenseContext(clean_per_class=10, show_progress=False),
                         preset="official")
    official = image_adapter.evaluate(res.model, bundle.test, attack)
    assert default["asr"] < official["asr"] - 5, (default, official)


@pytest.mark.xfail(strict=True, reason="issue target ASR < 10% not reached on the 8x8 digits victim (measured 19%)")
def test_nft_removes_backdoor_below_10_percent(digits_victim, image_adapter):
    before, after = _purify(image_adapter, digits_victim)
    assert after["asr"] < 10 and after["acc"] >= before["acc"] - 5
