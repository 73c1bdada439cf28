"""End-to-end regression on real data (scikit-learn digits): attack -> NFT -> evaluate.

The regression victim (``configs/image/digits16_badnets.yaml``): the digits upscaled to 16x16, a small CNN, the
3x3 BadNets patch, 10 clean images per class. Measured with the image default, fp32, one thread (session 24):
victim 93.33 / 98.52 (ACC / ASR); NFT on clean splits 0 / 1 / 2: 90.00 / 4.19, 90.67 / 5.42, 89.11 / 5.67 (session
26's default: 90.89 / 3.20, 90.89 / 3.20, 90.22 / 2.46; a recovery on crop + flip alone re-opened it to 93-96%), the
targeted search naming the target (class 0) on each; a victim trained with seed 1 (94.89 / 97.29): 94.00 / 1.72,
92.22 / 5.17, 93.56 / 1.97. The issue's target (ASR < 10%, ACC within 5 points) is asserted on all three splits.

The original 8x8 victim (``configs/image/digits_badnets.yaml``: 2x2 patch, 6.25% of the image) stays a measured gap:
NFT lowers its ASR from 97% to 19-34% (docs/nft-default.md, "Known gaps": two ``bn2`` channels carry the backdoor and also clean
features; no global setting tried took all three splits below 10%). Its drop of >= 50 points is asserted and the
< 10% target kept as a strict xfail, so that reaching it is noticed.
"""
from __future__ import annotations

import functools

import pytest

from core.config import load_config
from core.defenses.base import DefenseContext
from core.pipeline import attack_from_run, run_defense, train_victim


def _victim(adapter, config, tmp_path_factory):
    cfg = load_config(config)
    model, run, bundle = train_victim(adapter, cfg, tmp_path_factory.mktemp("v") / "victim", show_progress=False)
    return model, bundle, attack_from_run(adapter, run, bundle.num_classes), run.metrics()["before"]


def _purify(adapter, victim, split_seed=0, preset=None):
    model, bundle, attack, _ = victim
    clean, _ = adapter.clean_split(bundle, 10, seed=split_seed)
    res, _ = run_defense(adapter, model, clean, "nft", {}, DefenseContext(clean_per_class=10, show_progress=False,
                                                                            seed=split_seed), preset=preset)
    return adapter.evaluate(res.model, bundle.test, attack)


@pytest.fixture(scope="module")
def digits16_victim(tmp_path_factory, image_adapter):
    return _victim(image_adapter, "configs/image/digits16_badnets.yaml", tmp_path_factory)


@pytest.fixture(scope="module")
def digits16_purified(digits16_victim, image_adapter):
    """NFT's results on the 16x16 victim by (split seed, preset), each computed once."""
    return functools.cache(lambda split_seed, preset=None: _purify(image_adapter, digits16_victim, split_seed, preset))


@pytest.fixture(scope="module")
def digits8_victim(tmp_path_factory, image_adapter):
    return _victim(image_adapter, "configs/image/digits_badnets.yaml", tmp_path_factory)


@pytest.fixture(scope="module")
def digits8_purified(digits8_victim, image_adapter):
    return _purify(image_adapter, digits8_victim)


def test_victims_are_backdoored(digits16_victim, digits8_victim):
    for victim in (digits16_victim, digits8_victim):
        before = victim[3]
        assert before["asr"] >= 90 and before["acc"] >= 90, before


@pytest.mark.parametrize("split_seed", [0, 1, 2])
def test_nft_removes_backdoor_and_keeps_accuracy(digits16_victim, digits16_purified, split_seed):
    before, after = digits16_victim[3], digits16_purified(split_seed)
    assert after["asr"] < 10, after   # 3.20 / 3.20 / 2.46 measured (session 25's default: 4.19 / 5.42 / 5.67)
    assert after["acc"] >= before["acc"] - 5, (before, after)   # drops 2.44 / 2.44 / 3.11


def test_nft_default_beats_official_settings(digits16_purified):
    default, official = digits16_purified(0), digits16_purified(0, "official")
    assert default["asr"] < official["asr"] - 5, (default, official)


def test_nft_weakens_8x8_backdoor_and_keeps_accuracy(digits8_victim, digits8_purified):
    before, after = digits8_victim[3], digits8_purified
    assert after["asr"] <= before["asr"] - 50, after   # 97 -> 22 measured (session 17), 97 -> 19 (session 22)
    assert after["acc"] >= before["acc"] - 5, after


@pytest.mark.xfail(strict=True, reason="issue target ASR < 10% not reached on the 8x8 digits victim (measured 19%)")
def test_nft_removes_8x8_backdoor_below_10_percent(digits8_victim, digits8_purified):
    before, after = digits8_victim[3], digits8_purified
    assert after["asr"] < 10 and after["acc"] >= before["acc"] - 5
