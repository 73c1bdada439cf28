"""defense.autocast / defense.channels_last: validated, resolved per device, reach every defense, recorded."""
from __future__ import annotations

import copy

import pytest
import torch

from core.benchmark import defense_label, read_rows, run_grid
from core.defenses.base import DefenseContext
from core.pipeline import run_defense, speed_label, speed_options
from core.utils import bf16_is_fast
from modalities import get_modality

CPU = torch.device("cpu")


def test_speed_options_default_off_accept_booleans_and_auto():
    assert speed_options({}, CPU) == {"autocast": False, "channels_last": False}
    assert speed_options({"autocast": None, "channels_last": True}, CPU) == {"autocast": False, "channels_last": True}
    assert speed_options({"autocast": "auto"}, CPU)["autocast"] is bf16_is_fast(CPU)
    assert speed_label({"autocast": True, "channels_last": True}) == "bf16+channels_last"
    assert speed_label({"autocast": False, "channels_last": False}) == "fp32"


@pytest.mark.parametrize("key, value", [("autocast", "yes"), ("autocast", 1), ("channels_last", "auto")])
def test_a_speed_value_that_is_not_allowed_is_refused_with_the_fix(key, value):
    with pytest.raises(ValueError, match=rf"defense\.{key} must be .*--set defense\.{key}=true"):
        speed_options({key: value}, CPU)


def test_bf16_is_never_fast_on_a_device_it_does_not_know():
    assert bf16_is_fast(torch.device("meta")) is False


def test_autocast_forced_on_where_bf16_is_slow_warns_and_names_auto(monkeypatch):
    import core.pipeline

    monkeypatch.setattr(core.pipeline, "bf16_is_fast", lambda device: False)
    with pytest.warns(UserWarning, match="defense.autocast=auto"):
        assert speed_options({"autocast": True}, CPU)["autocast"] is True
    assert speed_options({"autocast": "auto"}, CPU)["autocast"] is False


def _masks(image_adapter, small_model, clean, **speed):
    ctx = DefenseContext(clean_per_class=5, show_progress=False, **speed)
    opts = {"steps": 12, "recover_steps": 0, "batch_size": 32}
    res, _ = run_defense(image_adapter, copy.deepcopy(small_model), clean, "nft", opts, ctx)
    return res.extras["masks"]


def test_channels_last_computes_the_same_nft_masks_and_bf16_close_ones(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 5, 0)
    fp32 = _masks(image_adapter, small_model, clean)
    cl = _masks(image_adapter, small_model, clean, channels_last=True)
    bf16 = _masks(image_adapter, small_model, clean, autocast=True, channels_last=True)
    moved = max(float((1 - m).abs().max()) for m in fp32.values())
    assert moved > 0.01  # the masks did move, so the comparison below means something
    for name, m in fp32.items():
        torch.testing.assert_close(cl[name], m, atol=1e-4, rtol=0)
        assert torch.isfinite(bf16[name]).all()
        assert float((bf16[name] - m).abs().max()) < 0.5 * moved


def test_grid_entry_speed_keys_reach_the_defense_get_their_own_label_and_are_recorded(tmp_path):
    assert defense_label({"name": "nft", "autocast": True}) == "nft+autocast"
    assert defense_label({"name": "ft", "channels_last": True, "preset": None}) == "ft+channels_last"
    assert defense_label({"name": "nft", "autocast": False}) == "nft"
    grid = {"base": "configs/image/digits_badnets.yaml",
            "grid": {"attack": [{"name": "badnets", "patch_size": 2}],
                     "defense": [{"name": "ft", "options": {"steps": 5}},
                                 {"name": "ft", "options": {"steps": 5}, "channels_last": True}],
                     "clean_per_class": [5], "seed": [0]}}
    run_grid(grid, get_modality, out_csv=tmp_path / "r.csv", victims_root=tmp_path / "victims", show_progress=False,
             echo=lambda *_: None)
    rows = {r["defense"]: r for r in read_rows(tmp_path / "r.csv")}
    assert rows["ft"]["speed"] == "fp32" and rows["ft+channels_last"]["speed"] == "fp32+channels_last"


def test_a_modality_measured_speed_default_applies_unless_the_config_or_a_preset_says_otherwise():
    from core.pipeline import defense_speed

    image = get_modality("image")
    # Image NFT: bf16 (where native) + channels_last by default; baselines keep fp32 (none set).
    assert defense_speed(image, {"name": "nft"}) == {"autocast": "auto", "channels_last": True}
    assert speed_options(defense_speed(image, {"name": "nft"}), CPU) == {"autocast": bf16_is_fast(CPU),
                                                                         "channels_last": True}
    assert defense_speed(image, {"name": "ft"}) == {} and speed_options({}, CPU)["autocast"] is False
    # What the config sets wins, and null counts as unset.
    assert defense_speed(image, {"name": "nft", "autocast": False}) == {"autocast": False, "channels_last": True}
    assert defense_speed(image, {"name": "nft", "autocast": None, "channels_last": False}) == \
        {"autocast": "auto", "channels_last": False}
    # A named preset (official, generic) computes as it always did: fp32 unless the config says otherwise.
    assert defense_speed(image, {"name": "nft", "preset": "official"}) == {}
    assert defense_speed(image, {"name": "nft", "preset": "generic", "channels_last": True}) == {"channels_last": True}
    # Video measured no speed default.
    assert defense_speed(get_modality("video"), {"name": "nft"}) == {}
