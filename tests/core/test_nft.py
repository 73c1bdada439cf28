import torch

from core.defenses.base import DefenseContext
from core.nft import NFT, OFFICIAL, UniversalPerturbation, lr_at
from core.registry import DEFENSES


def test_official_preset_matches_reference_code():
    cfg = NFT(preset="official").cfg
    assert (cfg["lr"], cfg["momentum"], cfg["lr_min"], cfg["steps"], cfg["batch_size"]) == (0.05, 0.95, 0.02, 1000, 128)
    assert cfg["eta"] == 1e-3 and cfg["reg_norm"] == "l1" and cfg["mixup_alpha"] == 1.0
    assert cfg["schedule"] == "exponential" and cfg["schedule_params"] == {"a": 0.8, "b": 0.5}
    assert cfg["bn_mode"] == "train" and not cfg["mask_beta"] and cfg["adv_frac"] == 0 and cfg["recover_steps"] == 0
    assert DEFENSES.get("nft") is NFT


def test_cosine_per_pass_schedule():
    assert lr_at(0, OFFICIAL) == 0.05
    assert lr_at(199, OFFICIAL) == 0.05  # constant within a pass of 200 batches
    assert 0.02 < lr_at(999, OFFICIAL) < lr_at(600, OFFICIAL) < 0.05


def test_unknown_option_is_refused():
    import pytest

    with pytest.raises(KeyError, match="unknown nft option"):
        NFT(stepz=3)


def test_universal_perturbation_stays_in_its_ball():
    g = torch.Generator().manual_seed(0)
    for norm, eps in (("linf", 0.2), ("l2", 1.5)):
        u = UniversalPerturbation((1, 4, 4), eps, 0.5, norm, torch.device("cpu"), g)
        for _ in range(5):
            u.delta.grad = torch.randn(1, 4, 4, generator=g)
            u.ascend()
        size = u.delta.abs().max() if norm == "linf" else u.delta.norm()
        assert float(size) <= eps + 1e-6 and u.delta.requires_grad


def test_nft_run_folds_clips_recovers_and_is_deterministic(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 5, 0)
    opts = {"steps": 30, "recover_steps": 30, "recover_check_every": 10, "batch_size": 32}
    outs = []
    for _ in range(2):
        model = type(small_model)(10, 1, 8)
        model.load_state_dict(small_model.state_dict())
        res = NFT(**opts).run(model, image_adapter, clean, DefenseContext(clean_per_class=5, show_progress=False))
        outs.append(res)
    a, b = outs
    assert type(a.model) is type(small_model)
    for name, m in a.extras["masks"].items():
        lo = a.info["lower_bounds"][a.info["units"].index(name)]
        assert float(m.min()) >= lo - 1e-6 and float(m.max()) <= 1.0
    assert any("clean_split_acc" in r for r in a.log)  # the recovery phase checked clean accuracy
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, b.model.state_dict()[k])


def test_default_recovery_keeps_mixup_and_strong_augmentation():
    cfg = NFT().cfg
    assert cfg["recover_steps"] > 0 and cfg["recover_mixup"] and cfg["recover_augment"] == "strong"
    assert cfg["adv_frac"] > 0 and cfg["recover_adv"] is False and cfg["bn_recalibrate"]


def _recovery_trainer(image_adapter, small_model, digits, **opts):
    from core.nft import MaskTrainer

    clean, _ = image_adapter.clean_split(digits, 5, 0)
    x, y = clean.__getitems__(list(range(32)))[:2]
    model = type(small_model)(10, 1, 8)
    model.load_state_dict(small_model.state_dict())
    cfg = NFT(steps=1, recover_steps=3, batch_size=32, **opts).cfg
    tr = MaskTrainer(model, image_adapter, cfg, x[:4], 5, torch.device("cpu"), torch.Generator().manual_seed(0))
    return tr, x, y


def test_recovery_mixes_and_moves_a_live_perturbation_only_in_live_mode(digits, image_adapter, small_model):
    tr, x, y = _recovery_trainer(image_adapter, small_model, digits, recover_adv="live", recover_mixup=True)
    tr.step(x, y, 0)
    before = tr.uap.delta.detach().clone()
    out = tr.step(x, y, 1)  # a recovery step
    assert 0.0 <= out["lambda"] <= 1.0 and out["lambda"] != 1.0  # MixUp on
    assert not torch.equal(before, tr.uap.delta.detach())  # the live perturbation ascended

    tr, x, y = _recovery_trainer(image_adapter, small_model, digits, recover_adv="frozen", recover_mixup=False)
    tr.step(x, y, 0)
    before = tr.uap.delta.detach().clone()
    out = tr.step(x, y, 1)
    assert out["lambda"] == 1.0 and torch.equal(before, tr.uap.delta.detach())


def test_bad_recovery_mode_is_refused(digits, image_adapter, small_model):
    import pytest

    with pytest.raises(ValueError, match="recover_adv must be"):
        _recovery_trainer(image_adapter, small_model, digits, recover_adv="sometimes")
