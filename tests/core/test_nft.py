import copy
import time

import pytest
import torch

from core.defenses.base import DefenseContext
from core.nft import (DEFAULTS, NFT, OFFICIAL, MaskTrainer, UniversalPerturbation, describe_seconds, describe_suspects,
                      lr_at)
from core.pipeline import run_defense
from core.regularizer import mask_penalty
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
    with pytest.raises(KeyError, match="unknown nft option"):
        NFT(stepz=3)


def test_universal_perturbation_stays_in_its_ball():
    g = torch.Generator().manual_seed(0)
    for norm, eps in (("linf", 0.2), ("l2", 1.5)):
        u = UniversalPerturbation((1, 4, 4), eps, 0.5, norm, torch.device("cpu"), g)
        for _ in range(5):
            u.delta.grad = torch.randn(1, 4, 4, generator=g)
            u.ascend()
        size = u.delta.detach().abs().max() if norm == "linf" else u.delta.detach().norm()
        assert float(size) <= eps + 1e-6 and u.delta.requires_grad


def test_nft_run_folds_clips_recovers_and_is_deterministic(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 5, 0)
    opts = {"steps": 30, "recover_steps": 30, "recover_check_every": 10, "batch_size": 32,
            "recover_check_min_samples": 50}
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


def test_recovery_perturbs_its_own_share_when_recover_adv_frac_is_set(image_adapter, small_model):
    import copy

    from core.nft import DEFAULTS, MaskTrainer

    x = torch.full((8, 1, 8, 8), 0.5)
    for frac, perturbed in ((None, 4), (0.25, 2)):   # None: the phase-one share, adv_frac 0.5
        cfg = dict(DEFAULTS, recover_adv="frozen", recover_mixup=False, recover_augment="none", recover_adv_frac=frac)
        trainer = MaskTrainer(copy.deepcopy(small_model), image_adapter, cfg, x, 2, torch.device("cpu"),
                              torch.Generator().manual_seed(0))
        trainer.uap.delta = torch.full((1, 8, 8), 0.1, requires_grad=True)
        seen = []
        hook = trainer.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        trainer.step(x, torch.zeros(8, dtype=torch.long), int(cfg["steps"]))   # the first recovery step
        hook.remove()
        shifted = (seen[0].mean(dim=(1, 2, 3)) - 0.5).abs() > 0.05
        assert shifted.tolist() == [True] * perturbed + [False] * (8 - perturbed)


def test_recovery_distillation_learns_from_the_original_only_where_it_is_right(digits, image_adapter, small_model):
    import torch.nn.functional as F

    tr, x, y = _recovery_trainer(image_adapter, small_model, digits, recover_mixup=False, recover_distill=0.5,
                                 recover_distill_temperature=2.0)
    assert tr.teacher is not None and not any(p.requires_grad for p in tr.teacher.parameters())
    with torch.no_grad():
        teacher = image_adapter.forward(tr.teacher, x)
    right = teacher.argmax(1) == y
    assert 0 < int(right.sum()) < len(y)   # the untrained small CNN is right on some images only
    student = torch.zeros(len(y), 10, requires_grad=True)
    loss = tr._plain_loss(x, student, y)
    ce = F.cross_entropy(student, y)
    kl = F.kl_div(F.log_softmax(student / 2, 1), F.log_softmax(teacher / 2, 1), reduction="none",
                  log_target=True).sum(1)
    torch.testing.assert_close(loss, 0.5 * ce + 0.5 * 4 * kl[right].mean())
    # the teacher is the model before masking: shrinking the masks changes the student only
    with torch.no_grad():
        tr.masks.fill_(0.5)
        torch.testing.assert_close(image_adapter.forward(tr.teacher, x), teacher)
    off, _, _ = _recovery_trainer(image_adapter, small_model, digits)
    assert off.teacher is None
    with pytest.raises(ValueError, match="recover_distill must be in"):
        _recovery_trainer(image_adapter, small_model, digits, recover_distill=1.5)


def test_bad_recovery_mode_is_refused(digits, image_adapter, small_model):
    with pytest.raises(ValueError, match="recover_adv must be"):
        _recovery_trainer(image_adapter, small_model, digits, recover_adv="sometimes")


def test_trace_follows_the_defense_and_interpolates_between_victim_and_result(digits, image_adapter, small_model):
    from core.nft import clean_accuracy, trace_nft

    clean, _ = image_adapter.clean_split(digits, 5, 0)
    held = digits.test
    opts = {"steps": 20, "recover_steps": 10, "recover_tolerance": -1, "batch_size": 32}
    cfg = NFT(**opts).cfg
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    acc = lambda m: {"acc": clean_accuracy(m, image_adapter, held, torch.device("cpu"))}  # noqa: E731
    rows = trace_nft(small_model, image_adapter, clean, cfg, acc, every=10, clean_per_class=5,
                     interpolate=[0.0, 1.0], show_progress=False)
    assert [(r["step"], r["phase"]) for r in rows] == [(10, "main"), (20, "main"), (30, "recovery"),
                                                       (30, "interpolated"), (30, "interpolated")]
    assert all(torch.equal(v, before[k]) for k, v in small_model.state_dict().items())  # input untouched
    # The last trace point is the model NFT returns (same seed, no early stop).
    model = type(small_model)(10, 1, 8)
    model.load_state_dict(small_model.state_dict())
    res = NFT(**opts).run(model, image_adapter, clean, DefenseContext(clean_per_class=5, show_progress=False))
    assert abs(rows[2]["acc"] - acc(res.model)["acc"]) < 1e-9 and rows[4]["acc"] == rows[2]["acc"]
    # t = 0 gives back the victim (with clean-data BN statistics, as every returned model has).
    victim = type(small_model)(10, 1, 8)
    victim.load_state_dict(before)
    from core.nft import recalibrate_norm_stats

    recalibrate_norm_stats(victim, image_adapter, clean, torch.device("cpu"))
    assert abs(rows[3]["acc"] - acc(victim)["acc"]) < 1e-9


def test_recovery_checks_compute_as_the_mask_training_unless_pinned_to_fp32(digits, image_adapter, small_model,
                                                                            monkeypatch):
    import core.nft as nft_module

    seen = []
    real = nft_module.clean_accuracy

    def recording(*args, **kwargs):
        seen.append(kwargs.get("use_autocast"))
        return real(*args, **kwargs)

    monkeypatch.setattr(nft_module, "clean_accuracy", recording)
    real_copy = nft_module.checked_copy

    def recording_copy(*args, **kwargs):   # the recovery checks
        seen.append(kwargs.get("use_autocast"))
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(nft_module, "checked_copy", recording_copy)
    clean, _ = image_adapter.clean_split(digits, 5, 0)
    opts = {"steps": 4, "recover_steps": 4, "recover_check_every": 2, "batch_size": 16, "recover_check_min_samples": 50}
    for pinned, ctx_bf16, expected in ((False, True, False), (True, True, True), (True, False, False)):
        seen.clear()
        NFT(**opts, checks_autocast=pinned).run(copy.deepcopy(small_model), image_adapter, clean,
                                                DefenseContext(clean_per_class=5, show_progress=False,
                                                               autocast=ctx_bf16))
        assert seen and all(v is expected for v in seen), (pinned, ctx_bf16, seen)


def test_recovery_runs_to_the_end_when_the_split_is_too_small_to_measure(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 5, 0)  # 50 images: one image is 2 points
    opts = {"steps": 10, "recover_steps": 20, "recover_check_every": 5, "batch_size": 16}
    res = NFT(**opts).run(small_model, image_adapter, clean, DefenseContext(clean_per_class=5, show_progress=False))
    assert NFT().cfg["recover_check_min_samples"] == 100
    assert not any("clean_split_acc" in r for r in res.log) and res.log[-1]["step"] == 30


def test_mask_exclude_leaves_named_units_unmasked_and_refuses_unknown_names(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 2, 0)
    opts = {"steps": 2, "recover_steps": 0, "batch_size": 8}
    res = NFT(mask_exclude=["bn3"], **opts).run(small_model, image_adapter, clean,
                                                DefenseContext(clean_per_class=2, show_progress=False))
    assert res.info["units"] == ["bn1", "bn2"]
    with pytest.raises(ValueError, match="not maskable units"):
        NFT(mask_exclude=["bn9"], **opts).run(small_model, image_adapter, clean,
                                              DefenseContext(clean_per_class=2, show_progress=False))


def test_mask_include_and_model_excluded_units_bring_back_what_the_model_leaves_out(digits, image_adapter, small_model):
    import copy

    clean, _ = image_adapter.clean_split(digits, 2, 0)
    opts = {"steps": 2, "recover_steps": 0, "batch_size": 8}
    ctx = DefenseContext(clean_per_class=2, show_progress=False)
    model = copy.deepcopy(small_model)
    model.nft_mask_exclude = ("bn1",)  # as a model that leaves its stem BN out
    assert NFT(**opts).run(copy.deepcopy(model), image_adapter, clean, ctx).info["units"] == ["bn2", "bn3"]
    for extra in ({"mask_include": ["bn1"]}, {"mask_model_excluded": True}):
        res = NFT(**opts, **extra).run(copy.deepcopy(model), image_adapter, clean, ctx)
        assert res.info["units"] == ["bn1", "bn2", "bn3"], extra
    with pytest.raises(ValueError, match="not an affine normalisation layer"):
        NFT(mask_include=["conv1"], **opts).run(copy.deepcopy(model), image_adapter, clean, ctx)


def test_mix_option_picks_a_mode_of_the_modality_and_refuses_unknown_ones(digits, image_adapter, small_model):
    import copy

    clean, _ = image_adapter.clean_split(digits, 2, 0)
    opts = {"steps": 2, "recover_steps": 0, "batch_size": 8}
    ctx = DefenseContext(clean_per_class=2, show_progress=False)
    for mode in ("mixup", "cutmix", "mixup_cutmix"):
        NFT(mix=mode, **opts).run(copy.deepcopy(small_model), image_adapter, clean, ctx)
    with pytest.raises(ValueError, match="no mix mode 'halfmix'"):
        NFT(mix="halfmix", **opts).run(copy.deepcopy(small_model), image_adapter, clean, ctx)


def test_modality_defense_defaults_sit_under_user_options_and_not_under_presets(digits, image_adapter, small_model):
    import copy

    from core.pipeline import run_defense

    clean, _ = image_adapter.clean_split(digits, 2, 0)
    adapter = copy.copy(image_adapter)
    adapter.defense_defaults = {"nft": {"eta": 0.5, "batch_size": 8}}
    ctx = DefenseContext(clean_per_class=2, show_progress=False)
    res, _ = run_defense(adapter, copy.deepcopy(small_model), clean, "nft", {"steps": 2, "recover_steps": 0, "eta": 0.25}, ctx)
    assert res.info["config"]["batch_size"] == 8 and res.info["config"]["eta"] == 0.25
    res, _ = run_defense(adapter, copy.deepcopy(small_model), clean, "nft", {"steps": 2, "batch_size": 8}, ctx,
                         preset="official")
    assert res.info["config"]["eta"] == OFFICIAL["eta"]
    from core.pipeline import make_defense

    # The trace tool and the step-time benchmark build NFT through the same merge.
    assert make_defense(adapter, "nft").cfg["eta"] == 0.5 and make_defense(adapter, "nft", preset="official").cfg["eta"] == 1e-3
    from modalities import get_modality

    assert get_modality("video").defense_defaults["nft"] == {"adv_shared_dims": [1], "mask_beta": True,
                                                             "mask_model_excluded": True, "adv_init": "targeted"}


def test_adv_shared_dims_shares_one_perturbation_value_along_those_dims(digits, image_adapter, small_model):
    import copy

    from core.nft import DEFAULTS, MaskTrainer

    x = torch.rand(4, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    trainer = MaskTrainer(copy.deepcopy(small_model), image_adapter, dict(DEFAULTS, adv_shared_dims=[1]), x, 2,
                          torch.device("cpu"), g)
    assert tuple(trainer.uap.delta.shape) == (1, 1, 8)  # one value per column, shared down the rows
    trainer.step(x, torch.tensor([0, 1, 2, 3]), 0)
    assert tuple(trainer.uap.delta.shape) == (1, 1, 8)
    with pytest.raises(ValueError, match="adv_shared_dims has 3"):
        MaskTrainer(copy.deepcopy(small_model), image_adapter, dict(DEFAULTS, adv_shared_dims=[3]), x, 2,
                    torch.device("cpu"), g)


def test_adv_count_gives_each_perturbation_its_own_slice_of_the_perturbed_share(image_adapter, small_model):
    import copy

    from core.nft import DEFAULTS, MaskTrainer

    x = torch.full((4, 1, 8, 8), 0.5)
    up, down = torch.full((1, 8, 8), 0.1), torch.full((1, 8, 8), -0.1)
    for frac, rows in ((1.0, [0.6, 0.6, 0.4, 0.4]), (0.5, [0.6, 0.4, 0.5, 0.5])):
        trainer = MaskTrainer(copy.deepcopy(small_model), image_adapter, dict(DEFAULTS, adv_count=2, adv_frac=frac),
                              x, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
        assert len(trainer.uaps) == 2 and trainer.uap is trainer.uaps[0]
        out = trainer._perturb_share(x, [up, down])
        torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.tensor(rows))
    with pytest.raises(ValueError, match="adv_count must be >= 1"):
        MaskTrainer(copy.deepcopy(small_model), image_adapter, dict(DEFAULTS, adv_count=0), x, 2,
                    torch.device("cpu"), torch.Generator())


class _PlantedBackdoor(torch.nn.Module):
    """A classifier with a planted pathway: the bottom-right 2x2 corner (``dense``: the whole image's mean) drives class 3."""

    def __init__(self, base: torch.nn.Module, dense: bool = False) -> None:
        super().__init__()
        self.base, self.dense = base, dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        region = x if self.dense else x[:, :, -2:, -2:]
        return out + 60.0 * region.mean(dim=(1, 2, 3))[:, None] * torch.nn.functional.one_hot(
            torch.tensor(3), out.shape[1]).to(out)


def test_targeted_search_ranks_the_planted_target_first_and_leaves_the_model_as_it_was(digits, image_adapter,
                                                                                       small_model):
    from core.nft import targeted_perturbation_search

    clean, _ = image_adapter.clean_split(digits, 5, 0)
    model = _PlantedBackdoor(small_model).train()
    runs = []
    for _ in range(2):
        runs.append(targeted_perturbation_search(model, image_adapter, clean, (1, 8, 8), 0.5, "linf", 10, 32,
                                                 torch.device("cpu"), torch.Generator().manual_seed(0)))
    found = runs[0]
    assert [r["class"] for r in found][0] == 3 and found[0]["reach"] >= 95, found[:2]
    assert len(found) == 10 and all(a["loss"] <= b["loss"] for a, b in zip(found, found[1:]))
    assert float(found[0]["delta"].abs().max()) <= 0.5 + 1e-6
    assert model.training and all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(found[0]["delta"], runs[1][0]["delta"])  # seeded
    # The descent in bf16 + channels_last (how image NFT computes where bf16 is native) finds the same target,
    # with the ranking's losses still in fp32.
    fast = targeted_perturbation_search(model, image_adapter, clean, (1, 8, 8), 0.5, "linf", 10, 32,
                                        torch.device("cpu"), torch.Generator().manual_seed(0), use_autocast=True,
                                        channels_last=True)
    assert fast[0]["class"] == 3 and fast[0]["reach"] >= 95 and all(isinstance(r["loss"], float) for r in fast)


def test_recovery_watch_restores_the_last_check_before_the_suspect_reach_rose(digits, image_adapter, small_model,
                                                                             monkeypatch):
    from torch.nn.utils import parametrize

    import core.nft as nft_module

    clean, _ = image_adapter.clean_split(digits, 10, 0)   # 100 images: the recovery checks run
    ctx = DefenseContext(clean_per_class=10, show_progress=False)
    opts = {"steps": 4, "recover_steps": 6, "recover_check_every": 2, "recover_tolerance": -0.0, "batch_size": 16,
            "adv_init": "targeted", "adv_init_steps": 5, "recover_watch": 0.01}
    # The planted path is outside every mask, so delta_3 reaches class 3 throughout: the watch never fires.
    res = NFT(**opts).run(_PlantedBackdoor(small_model), image_adapter, clean, ctx)
    watch = res.info["recover_watch"]
    assert watch["active"] and "fired_at" not in watch
    reach = [r for r in res.log if "suspect_reach" in r]
    assert reach[0]["step"] == 4 and all(r["suspect_reach"] >= 95 for r in reach) and len(reach) >= 2
    # A reach that rises after phase one (forced here): the masks of the last check before it are returned.
    seen = []

    def rising(model, adapter, data, target, delta, device, **kw):
        seen.append({n: m.parametrizations.weight[0].mask.detach().clone() for n, m in model.named_modules()
                     if parametrize.is_parametrized(m, "weight")})
        n = int(sum(int((b[1] != target).sum()) for b in adapter.loader(data, 256)))
        return torch.full((n,), len(seen) > 2, dtype=torch.bool)

    monkeypatch.setattr(nft_module, "suspect_hits", rising)
    real_check = nft_module.checked_copy
    monkeypatch.setattr(nft_module, "checked_copy", lambda *a, **k: (real_check(*a, **k)[0], -1.0))  # no accuracy stop
    res = NFT(**opts).run(_PlantedBackdoor(small_model), image_adapter, clean, ctx)
    watch = res.info["recover_watch"]
    assert (watch["fired_at"], watch["restored_step"]) == (8, 6) and watch["p"] < 0.01 and watch["lost"] == 0
    for name, mask in res.extras["masks"].items():
        torch.testing.assert_close(mask, seen[1][name])   # the check at step 6
    assert res.log[-1]["step"] == 8 or all(r["step"] <= 8 for r in res.log)
    # Off (the default): no watch, no reach in the log.
    res = NFT(**{**opts, "recover_watch": 0.0}).run(_PlantedBackdoor(small_model), image_adapter, clean, ctx)
    assert "recover_watch" not in res.info and not any("suspect_reach" in r for r in res.log)
    with pytest.raises(ValueError, match="recover_watch is a significance level"):
        NFT(**{**opts, "recover_watch": 5}).run(_PlantedBackdoor(small_model), image_adapter, clean, ctx)


def test_nft_says_where_its_seconds_went(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 5, 0)
    ctx = DefenseContext(clean_per_class=5, show_progress=False)
    opts = {"steps": 3, "recover_steps": 2, "batch_size": 16, "adv_init": "targeted", "adv_init_steps": 3}
    t0 = time.perf_counter()
    res = NFT(**opts).run(_PlantedBackdoor(small_model), image_adapter, clean, ctx)
    wall = time.perf_counter() - t0
    phases = res.info["seconds_by_phase"]
    assert list(phases) == ["norm_reference", "perturbation_search", "phase_one", "recovery", "fold_and_recalibrate"]
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= wall
    assert phases["perturbation_search"] > 0 and phases["phase_one"] > 0 and phases["recovery"] > 0
    line = describe_seconds(res.info)   # what tools/purify.py and the demo print
    assert line.startswith(f"NFT's {sum(phases.values()):.1f} s") and "perturbation search" in line
    # No recovery steps: the loop is phase one alone.
    res = NFT(**{**opts, "recover_steps": 0}).run(_PlantedBackdoor(small_model), image_adapter, clean, ctx)
    assert res.info["seconds_by_phase"]["phase_one"] > 0
    assert describe_seconds({"config": {}}) is None   # a defense that records no phases


def test_nft_targeted_init_reports_the_suspects_and_refuses_unknown_inits(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 5, 0)
    ctx = DefenseContext(clean_per_class=5, show_progress=False)
    opts = {"steps": 2, "recover_steps": 0, "batch_size": 16, "adv_init": "targeted", "adv_init_steps": 5,
            "adv_count": 2, "adv_init_top": 1}
    res = NFT(**opts).run(_PlantedBackdoor(small_model), image_adapter, clean, ctx)
    suspects = res.info["suspected_targets"]
    assert suspects[0]["class"] == 3 and set(suspects[0]) == {"class", "loss", "reach", "targeted_start", "norm", "eps"}
    assert suspects[0]["targeted_start"] and set(suspects[1]) == {"class", "loss", "reach"}
    line = describe_suspects(res.info)   # what tools/purify.py and the demo print
    assert "class 3 is reached most easily" in line and line.endswith("the perturbation started from it")
    assert f"below class {suspects[1]['class']}'s" in line
    # No class stands out by a factor of 1e12: every perturbation starts random.
    res = NFT(**{**opts, "adv_init_margin": 1e12}).run(_PlantedBackdoor(small_model), image_adapter, clean, ctx)
    assert not res.info["suspected_targets"][0]["targeted_start"]
    assert describe_suspects(res.info).endswith("no class stood out (ratio below adv_init_margin), "
                                                "so the perturbation started random")
    # "auto" searches only on a split of at least adv_init_min_samples (this one has 50).
    res = NFT(**{**opts, "adv_init": "auto", "adv_init_min_samples": 50}).run(_PlantedBackdoor(small_model),
                                                                             image_adapter, clean, ctx)
    assert res.info["suspected_targets"][0]["class"] == 3
    res = NFT(**{**opts, "adv_init": "auto", "adv_init_min_samples": 51}).run(_PlantedBackdoor(small_model),
                                                                             image_adapter, clean, ctx)
    assert "suspected_targets" not in res.info and describe_suspects(res.info) is None
    with pytest.raises(ValueError, match="adv_init must be 'random', 'targeted' or 'auto'"):
        NFT(**{**opts, "adv_init": "planted"}).run(_PlantedBackdoor(small_model), image_adapter, clean, ctx)


def test_shift_recalibration_keeps_the_trained_statistics_and_adds_only_the_change(digits, image_adapter, small_model):
    from core.nft import norm_reference, recalibrate_norm_stats

    clean, _ = image_adapter.clean_split(digits, 5, 0)
    cpu = torch.device("cpu")
    # Running statistics near but not equal to the split's, as those of a model trained on more data.
    ref = norm_reference(small_model, image_adapter, clean, cpu)
    with torch.no_grad():
        for name in ("bn1", "bn2", "bn3"):
            bn, r = getattr(small_model, name), ref[name]
            bn.running_mean.copy_(r["clean_mean"] + 0.3 * r["clean_var"].sqrt() * torch.randn_like(r["clean_mean"]).clamp(-1, 1))
            bn.running_var.copy_(r["clean_var"] * torch.empty_like(r["clean_var"]).uniform_(0.7, 1.4))
    own = {k: v.clone() for k, v in small_model.state_dict().items() if "running" in k}
    ref = norm_reference(small_model, image_adapter, clean, cpu)
    assert all(torch.equal(v, small_model.state_dict()[k]) for k, v in own.items())  # the model is untouched
    # Nothing changed: "shift" gives back the model's own statistics; a full recalibration does not.
    model = copy.deepcopy(small_model)
    recalibrate_norm_stats(model, image_adapter, clean, cpu, reference=ref)
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-5) for k, v in own.items())
    full = copy.deepcopy(small_model)
    recalibrate_norm_stats(full, image_adapter, clean, cpu)
    assert not torch.allclose(full.bn1.running_mean, own["bn1.running_mean"], atol=1e-3)
    # A channel whose own statistics are far from the split's (fitted on other data) keeps the split's.
    odd = copy.deepcopy(small_model)
    with torch.no_grad():
        odd.bn2.running_mean[0] += 5 * float(ref["bn2"]["clean_var"][0].sqrt()) + 1
    odd_ref = norm_reference(odd, image_adapter, clean, cpu)
    recalibrate_norm_stats(odd, image_adapter, clean, cpu, reference=odd_ref)
    assert torch.allclose(odd.bn2.running_mean[0], full.bn2.running_mean[0], atol=1e-5)
    assert torch.allclose(odd.bn2.running_mean[1:], own["bn2.running_mean"][1:], atol=1e-5)
    # Doubling conv1 doubles bn1's input: its mean moves by the split's mean, its variance scales by 4.
    with torch.no_grad():
        model.conv1.weight.mul_(2.0)
    recalibrate_norm_stats(model, image_adapter, clean, cpu, reference=ref)
    r = ref["bn1"]
    assert torch.allclose(model.bn1.running_mean, own["bn1.running_mean"] + r["clean_mean"], atol=1e-4)
    eps = model.bn1.eps
    want = (own["bn1.running_var"] + eps) * (4 * r["clean_var"] + eps) / (r["clean_var"] + eps) - eps
    assert torch.allclose(model.bn1.running_var, want, rtol=1e-4, atol=1e-5)


def test_bn_recalibrate_refuses_an_unknown_mode(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 2, 0)
    with pytest.raises(ValueError, match="bn_recalibrate"):
        NFT(steps=1, recover_steps=0, bn_recalibrate="half").run(
            small_model, image_adapter, clean, DefenseContext(clean_per_class=2, show_progress=False))


def test_recover_mixup_frac_mixes_only_that_share_of_a_recovery_batch(image_adapter, small_model):
    from core.nft import DEFAULTS, MaskTrainer

    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 4

    def recovery_loss(**opts):
        cfg = dict(DEFAULTS, steps=0, augment="weak", recover_augment="weak", **opts)
        trainer = MaskTrainer(copy.deepcopy(small_model), image_adapter, cfg, x[:2], 2, torch.device("cpu"),
                              torch.Generator().manual_seed(0))
        return float(trainer.step(x, y, 0)["loss"])   # step 0 >= steps: a recovery step

    plain = recovery_loss(recover_mixup=False)
    assert recovery_loss(recover_mixup=True, recover_mixup_frac=0.0) == pytest.approx(plain)  # nothing mixed
    whole, half = recovery_loss(recover_mixup=True), recovery_loss(recover_mixup=True, recover_mixup_frac=0.5)
    assert half != pytest.approx(plain) and half != pytest.approx(whole)
    with pytest.raises(ValueError, match="recover_mixup_frac"):
        recovery_loss(recover_mixup=True, recover_mixup_frac=1.5)


def test_image_modality_ships_its_measured_nft_settings(image_adapter):
    from core.nft import DEFAULTS, NFT
    from core.pipeline import make_defense

    assert image_adapter.defense_defaults["nft"] == {"bn_recalibrate": "shift", "recover_mixup_frac": 0.5,
                                                     "adv_init": "auto", "adv_init_margin": 5.0,
                                                     "adv_init_min_samples": 10,
                                                     "adv_targeted_lr": 0.0, "adv_target_weight": 1.0,
                                                     "small_split_steps": 100,
                                                     "adv_init_families": [{"norm": "l1", "eps": 12.0}],
                                                     "adv_init_keep": 3,
                                                     "recover_lr": 0.04, "recover_plain_augment": "weak",
                                                     "recover_tolerance": 0.5,
                                                     "small_split_options": {"recover_lr": 0.02,
                                                                             "recover_plain_augment": None}}
    cfg = make_defense(image_adapter, "nft").cfg
    # Session 26's recovery where the stop can measure; session 25's on a one-shot split, where it runs whole.
    from core.nft import config_for_split
    assert (cfg["recover_lr"], cfg["recover_augment"], cfg["recover_plain_augment"]) == (0.04, "strong", "weak")
    assert cfg["recover_tolerance"] == 0.5
    one_shot = config_for_split(cfg, 10)
    assert (one_shot["recover_lr"], one_shot["recover_plain_augment"], one_shot["steps"]) == (0.02, None, 100)
    assert cfg["bn_recalibrate"] == "shift" and cfg["recover_mixup_frac"] == 0.5
    assert cfg["adv_init"] == "auto" and cfg["adv_init_margin"] == 5.0 and cfg["adv_init_min_samples"] == 10
    # A grid entry pins the random start of sessions 7-16 for the rows that ran with it.
    assert make_defense(image_adapter, "nft", {"adv_init": "random"}).cfg["adv_init"] == "random"
    # The core default alone (what image NFT ran before these settings) stays reachable by name.
    generic = {k: v for k, v in make_defense(image_adapter, "nft", preset="generic").cfg.items() if k != "preset"}
    assert generic == {k: v for k, v in NFT().cfg.items() if k != "preset"} == dict(DEFAULTS)


def test_recovery_lr_is_constant_or_anneals_to_zero_and_an_unknown_schedule_fails_early(image_adapter, small_model):
    from core.nft import DEFAULTS, MaskTrainer, recover_lr_at

    cfg = dict(DEFAULTS, recover_steps=100, recover_lr=0.02)
    assert [recover_lr_at(s, cfg) for s in (0, 50, 99)] == [0.02] * 3
    cos = dict(cfg, recover_lr_schedule="cosine")
    assert recover_lr_at(0, cos) == 0.02 and recover_lr_at(50, cos) == pytest.approx(0.01)
    assert recover_lr_at(100, cos) == pytest.approx(0.0, abs=1e-12) and recover_lr_at(200, cos) == pytest.approx(0.0, abs=1e-12)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 4
    trainer = MaskTrainer(copy.deepcopy(small_model), image_adapter, dict(cos, steps=2), x[:2], 2,
                          torch.device("cpu"), torch.Generator().manual_seed(0))
    trainer.step(x, y, 2 + 50)   # a recovery step sets the annealed rate
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="recover_lr_schedule"):
        MaskTrainer(copy.deepcopy(small_model), image_adapter, dict(cfg, recover_lr_schedule="step"), x[:2], 2,
                    torch.device("cpu"), torch.Generator().manual_seed(0))


def test_sign_test_p_is_the_exact_binomial_tail():
    from core.nft import sign_test_p

    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 0) == pytest.approx(1 / 8)
    assert sign_test_p(7, 0) == pytest.approx(1 / 128)
    assert sign_test_p(2, 2) == pytest.approx(11 / 16)  # P(X >= 2), X ~ Bin(4, 1/2)
    assert sign_test_p(195, 9) < 1e-40  # bppa@8ep's split (docs/nft-default.md): far below any alpha


def test_shift_that_breaks_the_model_on_the_split_is_rejected(digits, image_adapter):
    """Per channel the shift can look sound (variance within 4x) and still break the model:
    the clean-split sign test then keeps the split's own statistics (bppa@8ep, docs/nft-default.md)."""
    from core.nft import clean_accuracy, norm_reference, recalibrate_norm_stats
    from core.train import train_classifier

    torch.manual_seed(0)
    model = image_adapter.build_model("small_cnn", 10, in_channels=1, width=8)
    train_classifier(model, image_adapter, digits.train, {"epochs": 15, "batch_size": 64, "lr": 0.05}, seed=0,
                     show_progress=False)
    clean, _ = image_adapter.clean_split(digits, 10, 0)
    cpu = torch.device("cpu")
    ref = norm_reference(model, image_adapter, clean, cpu)
    # Own variances a third of the split's in every channel: each passes the per-channel 4x rule.
    bad_ref = {n: {**r, "running_var": r["clean_var"] / 3, "running_mean": r["clean_mean"]} for n, r in ref.items()}
    shifted = copy.deepcopy(model)
    assert recalibrate_norm_stats(shifted, image_adapter, clean, cpu, reference=bad_ref)["mode"] == "shift"
    broken_acc = clean_accuracy(shifted, image_adapter, clean, cpu)
    m = copy.deepcopy(model)
    info = recalibrate_norm_stats(m, image_adapter, clean, cpu, reference=bad_ref, shift_check_alpha=0.01,
                                  shift_check_margin=5.0)
    assert info["mode"] == "shift rejected" and info["full_only"] > info["shift_only"] and info["p"] < 0.01
    # A significant loss smaller than the margin keeps the shift (the split favours its own statistics).
    gap = 100.0 * (info["full_only"] - info["shift_only"]) / len(clean)
    kept = recalibrate_norm_stats(copy.deepcopy(model), image_adapter, clean, cpu, reference=bad_ref,
                                  shift_check_alpha=0.01, shift_check_margin=gap)
    assert kept["mode"] == "shift" and kept["split_acc"] == broken_acc
    acc = clean_accuracy(m, image_adapter, clean, cpu)
    full = copy.deepcopy(model)
    assert recalibrate_norm_stats(full, image_adapter, clean, cpu)["mode"] == "full"
    assert acc == clean_accuracy(full, image_adapter, clean, cpu) and acc > broken_acc + 10
    assert torch.equal(m.bn1.running_var, full.bn1.running_var)
    # The model's own, sound statistics: the shift is kept.
    m = copy.deepcopy(model)
    assert recalibrate_norm_stats(m, image_adapter, clean, cpu, reference=ref, shift_check_alpha=0.01)["mode"] == "shift"


def test_away_from_target_is_minus_log_not_t_weighted_by_the_mixed_labels_share_not_t(image_adapter, small_model):
    x = torch.zeros(4, 1, 8, 8)
    trainer = MaskTrainer(copy.deepcopy(small_model), image_adapter, dict(DEFAULTS, adv_frac=0.5), x, 2,
                          torch.device("cpu"), torch.Generator())
    trainer.suspect = {"class": 2, "delta": torch.zeros(1, 8, 8)}
    out = torch.randn(4, 10)
    ya, yb, lam = torch.tensor([2, 5, 1, 1]), torch.tensor([7, 2, 1, 1]), 0.75
    p_t = out[:2].softmax(1)[:, 2]
    # Row 0: a quarter of its label is not t; row 1: three quarters. Rows 2-3 are not perturbed.
    expected = -(torch.tensor([0.25, 0.75]) * torch.log1p(-p_t)).mean()
    torch.testing.assert_close(trainer._away_from_target(out, ya, yb, lam), expected)
    # Descending it lowers p_t on the perturbed rows (the masks' side of the term).
    logits = out.clone().requires_grad_(True)
    trainer._away_from_target(logits, ya, yb, lam).backward()
    assert float(logits.grad[0, 2]) > 0 and float(logits.grad[1, 2]) > 0 and float(logits.grad[2:].abs().sum()) == 0


def test_a_targeted_start_can_hold_delta_t_and_push_away_from_the_suspect(digits, image_adapter, small_model):
    from core.nft import start_perturbations

    clean, _ = image_adapter.clean_split(digits, 5, 0)
    opts = dict(DEFAULTS, adv_init="targeted", adv_init_steps=5, adv_targeted_lr=0.0, adv_target_weight=1.0,
                batch_size=16)
    x, y = next(iter(image_adapter.loader(clean, 16)))[:2]

    def trainer_for(cfg):
        t = MaskTrainer(_PlantedBackdoor(copy.deepcopy(small_model)), image_adapter, cfg, x[:8], 5,
                        torch.device("cpu"), torch.Generator().manual_seed(0))
        start_perturbations(t, clean, torch.device("cpu"))
        return t

    held = trainer_for(opts)
    assert held.suspect["class"] == 3 and held.uap.lr == 0.0
    start = held.uap.delta.detach().clone()
    grads_seen = []
    ascend = held.uap.ascend
    held.uap.ascend = lambda: (grads_seen.append(held.uap.delta.grad), ascend())
    steps = [held.step(x, y, s) for s in range(3)]
    assert torch.equal(held.uap.delta.detach(), start)                  # delta_t held, to the bit
    # ... and detached from the step: its input gradient is never computed (nothing reads it), the masks' still is
    assert grads_seen == [None] * 3 and all(m.grad is not None for m in held.masks.parameters())
    assert all(float(r["loss"]) > float(r["task_loss"]) for r in steps)   # the away term is in the loss
    # Without a suspect (no class stands out) the perturbation starts random and ascends at adv_lr, no away term.
    rand = trainer_for(dict(opts, adv_init_margin=1e12))
    assert rand.suspect is None and rand.uap.lr == DEFAULTS["adv_lr"]
    start = rand.uap.delta.detach().clone()
    r = rand.step(x, y, 0)
    assert not torch.equal(rand.uap.delta.detach(), start)
    reg = rand.reg_w * mask_penalty(rand.masks.parameters(), DEFAULTS["reg_norm"])
    torch.testing.assert_close(float(r["loss"]), float(r["task_loss"]) + float(reg.detach()), rtol=0, atol=1e-4)
    for bad in ({"adv_target_weight": -1.0}, {"adv_targeted_lr": -0.1}):
        with pytest.raises(ValueError, match="must be >= 0"):
            trainer_for(dict(opts, **bad))


def test_recovery_away_share_carries_delta_t_and_trains_only_away_from_the_suspect(image_adapter, small_model):
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    cfg = dict(DEFAULTS, steps=1, recover_steps=1, recover_augment=None, recover_mixup=False, adv_target_weight=2.0,
               recover_away_frac=0.25, recover_lr=0.0)
    trainer = MaskTrainer(copy.deepcopy(small_model), image_adapter, cfg, x, 1, torch.device("cpu"), torch.Generator())
    delta = torch.full((1, 8, 8), 0.3)
    trainer.suspect = {"class": 2, "delta": delta}
    assert trainer._recover_away_count(8, 0) == 2 and trainer._recover_away_count(8, 7) == 0
    assert trainer._recover_away_count(8, 4) == 2 and trainer._recover_away_count(8, 6) == 1  # one plain image stays
    with torch.no_grad():   # train-mode BN: the expected loss from the same batch, before the (lr 0) step
        out = trainer.model(torch.cat([x[:6], (x[6:] + delta).clamp(0, 1)]))
    expected = torch.nn.functional.cross_entropy(out[:6], y[:6]) + 2.0 * trainer._away_loss(out[6:], y[6:], y[6:], 1.0)
    got = trainer.step(x, y, 1)["loss"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Without a suspect (random start) or with the term off, recovery is unchanged.
    trainer.cfg = dict(cfg, adv_target_weight=0.0)
    assert trainer._recover_away_count(8, 0) == 0
    trainer.cfg, trainer.suspect = cfg, None
    assert trainer._recover_away_count(8, 0) == 0
    with pytest.raises(ValueError, match="recover_away_frac"):
        MaskTrainer(copy.deepcopy(small_model), image_adapter, dict(cfg, recover_away_frac=1.0), x, 1,
                    torch.device("cpu"), torch.Generator())


def test_a_split_below_the_check_floor_runs_small_split_steps_of_phase_one():
    from core.nft import config_for_split

    cfg = dict(DEFAULTS, steps=200, small_split_steps=100, recover_check_min_samples=100)
    assert config_for_split(cfg, 10)["steps"] == 100 and config_for_split(cfg, 99)["steps"] == 100
    assert config_for_split(cfg, 100) is cfg and config_for_split(dict(cfg, small_split_steps=None), 10)["steps"] == 200
    assert cfg["steps"] == 200   # the defense's own config is left as it was
    assert config_for_split(dict(cfg, steps=40), 10)["steps"] == 40   # a shorter phase one is kept
    with pytest.raises(ValueError, match="small_split_steps must be a positive"):
        config_for_split(dict(cfg, small_split_steps=0), 600)   # refused on any split, before any work


def test_small_split_options_replace_the_config_only_below_the_check_floor():
    from core.nft import config_for_split

    cfg = dict(DEFAULTS, recover_lr=0.04, recover_augment="weak", recover_check_min_samples=100,
               small_split_steps=None, small_split_options={"recover_lr": 0.02, "recover_augment": "strong"})
    small = config_for_split(cfg, 10)
    assert (small["recover_lr"], small["recover_augment"], small["steps"]) == (0.02, "strong", cfg["steps"])
    assert config_for_split(cfg, 100) is cfg and cfg["recover_lr"] == 0.04   # a measurable split: its own options
    both = config_for_split(dict(cfg, small_split_steps=50), 10)
    assert both["steps"] == 50 and both["recover_lr"] == 0.02
    with pytest.raises(ValueError, match=r"small_split_options names \['recover_lrr'\]"):
        config_for_split(dict(cfg, small_split_options={"recover_lrr": 0.1}), 600)
    with pytest.raises(ValueError, match="other than small_split_"):
        config_for_split(dict(cfg, small_split_options={"small_split_steps": 5}), 600)
    with pytest.raises(ValueError, match="must be a mapping"):
        config_for_split(dict(cfg, small_split_options=[1]), 600)


def test_nft_on_a_one_shot_split_logs_small_split_steps_of_phase_one(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 1, 0)
    opts = {"small_split_steps": 7, "recover_steps": 3, "batch_size": 16}
    res, _ = run_defense(image_adapter, small_model, clean, "nft", opts, DefenseContext(clean_per_class=1,
                                                                                       show_progress=False))
    assert res.info["config"]["steps"] == 7
    assert max(r["step"] for r in res.log if "loss" in r) == 10   # 7 main + 3 recovery steps, then it stops


def test_l1_projection_is_the_nearest_point_of_the_ball():
    from core.nft import project_l1_ball

    inside = torch.tensor([0.5, -0.25, 0.0])
    assert torch.equal(project_l1_ball(inside, 1.0), inside)
    # Hand-computed: soft-thresholding of (3, -1, 0.5) at theta = 1 gives (2, 0, 0), L1 length 2.
    torch.testing.assert_close(project_l1_ball(torch.tensor([3.0, -1.0, 0.5]), 2.0), torch.tensor([2.0, 0.0, 0.0]))
    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 5, 5, generator=g) * 4
    p = project_l1_ball(d, 6.0)
    assert abs(float(p.abs().sum()) - 6.0) < 1e-4 and p.shape == d.shape
    # No other point of the ball on a random direction from p is closer to d (first-order optimality).
    for _ in range(20):
        q = project_l1_ball(p + 0.05 * torch.randn(p.shape, generator=g), 6.0)
        assert float((d - p).norm()) <= float((d - q).norm()) + 1e-5
    assert torch.equal(project_l1_ball(d, 0.0), torch.zeros_like(d))


def test_l1_perturbation_moves_few_inputs_and_stays_in_its_ball():
    g = torch.Generator().manual_seed(0)
    u = UniversalPerturbation((1, 10, 10), 3.0, 0.5, "l1", torch.device("cpu"), g)
    assert float(u.delta.detach().abs().sum()) <= 3.0 + 1e-6
    start = u.delta.detach().clone()
    grad = torch.zeros(1, 10, 10)
    grad[0, 9, 9], grad[0, 0, 0] = 5.0, -4.0            # two inputs carry the whole gradient
    u.delta.grad = grad
    u.ascend()
    moved = (u.delta.detach() - start).abs() > 1e-7
    # The step moves the top 5% of coordinates that have a gradient (here two), by L1 length 0.5 in all; the
    # random start sits well inside the ball (L1 about 1.5), so no projection moves the others.
    assert int(moved.sum()) == 2 and abs(float((u.delta.detach() - start).abs().sum()) - 0.5) < 1e-6
    d = u.delta.detach()
    assert float(d[0, 9, 9]) > float(start[0, 9, 9]) and float(d[0, 0, 0]) < float(start[0, 0, 0])
    for _ in range(30):
        u.delta.grad = torch.randn(1, 10, 10, generator=g)
        u.ascend()
        assert float(u.delta.detach().abs().sum()) <= 3.0 + 1e-5 and u.delta.requires_grad
    with pytest.raises(ValueError, match="adv_norm must be one of"):
        UniversalPerturbation((1, 4, 4), 1.0, 0.1, "l0", torch.device("cpu"), g)


def test_perturbation_families_scale_l1_by_channels_and_refuse_bad_entries():
    from core.nft import perturbation_families

    cfg = {**DEFAULTS, "adv_init_families": [{"norm": "l1", "eps": 4}, {"norm": "l2", "eps": 2.0, "lr": 0.3}]}
    fams = perturbation_families(cfg, (3, 8, 8))
    assert fams[0] == {"norm": "linf", "eps": 0.2, "lr": 0.01}
    assert fams[1] == {"norm": "l1", "eps": 12.0, "lr": pytest.approx(12.0 * 0.01 / 0.2)}   # 4 per channel
    assert fams[2] == {"norm": "l2", "eps": 2.0, "lr": 0.3}
    for bad in ({"norm": "l0", "eps": 1}, {"norm": "l1"}, {"norm": "l1", "eps": 2, "step": 1}, "l1"):
        with pytest.raises(ValueError, match="adv_init_families"):
            perturbation_families({**cfg, "adv_init_families": [bad]}, (1, 8, 8))


def test_targeted_start_takes_the_family_in_which_a_class_stands_out(digits, image_adapter, small_model):
    clean, _ = image_adapter.clean_split(digits, 5, 0)
    ctx = DefenseContext(clean_per_class=5, show_progress=False)
    opts = {"steps": 2, "recover_steps": 0, "batch_size": 16, "adv_init": "targeted", "adv_init_steps": 10,
            "adv_eps": 0.02, "adv_lr": 0.001, "adv_init_margin": 2.0,
            "adv_init_families": [{"norm": "l1", "eps": 4}]}
    # A 2x2 corner patch: four full-scale pixels (L1 4) reach class 3; an L-inf ball of 0.02 barely moves it.
    res = NFT(**opts).run(_PlantedBackdoor(copy.deepcopy(small_model)), image_adapter, clean, ctx)
    top, search = res.info["suspected_targets"][0], res.info["perturbation_search"]
    assert top["class"] == 3 and top["targeted_start"] and (top["norm"], top["eps"]) == ("l1", 4.0)
    assert [f["norm"] for f in search] == ["linf", "l1"] and search[1]["ratio"] > max(search[0]["ratio"], 2.0)
    line = describe_suspects(res.info)
    assert line.startswith("targeted search (L1 ball 4): class 3") and "[L-inf ball 0.02: class" in line
    # (NFT folds into the model it is given: each run gets its own copy.)
    # A dense pathway (the image's mean): the L-inf ball of 0.2 moves every pixel, the L1 ball of 4 a sixteenth.
    dense = {**opts, "adv_eps": 0.2, "adv_lr": 0.01}
    res = NFT(**dense).run(_PlantedBackdoor(copy.deepcopy(small_model), dense=True), image_adapter, clean, ctx)
    top, search = res.info["suspected_targets"][0], res.info["perturbation_search"]
    assert top["class"] == 3 and top["targeted_start"] and top["norm"] == "linf"
    assert search[0]["ratio"] > search[1]["ratio"]
    # When the first family wins, the run is the one without further families, to the bit.
    alone = NFT(**{**dense, "adv_init_families": []}).run(_PlantedBackdoor(copy.deepcopy(small_model), dense=True), image_adapter, clean, ctx)
    for name, mask in res.extras["masks"].items():
        assert torch.equal(mask, alone.extras["masks"][name])


def test_trainer_switches_its_perturbations_to_the_winning_family(digits, image_adapter, small_model):
    from core.nft import start_mask_training

    clean, _ = image_adapter.clean_split(digits, 5, 0)
    cfg = {**DEFAULTS, "steps": 2, "recover_steps": 0, "batch_size": 16, "adv_init": "targeted", "adv_init_steps": 10,
           "adv_eps": 0.02, "adv_lr": 0.001, "adv_count": 2, "adv_init_margin": 2.0,
           "adv_init_families": [{"norm": "l1", "eps": 4, "lr": 0.25}]}
    trainer, _ = start_mask_training(_PlantedBackdoor(small_model), image_adapter, clean, cfg, 5, torch.device("cpu"), 0)
    assert [(u.norm, u.eps, u.lr) for u in trainer.uaps] == [("l1", 4.0, 0.25)] * 2
    assert trainer.suspect["class"] == 3 and float(trainer.uaps[0].delta.abs().sum()) <= 4.0 + 1e-5
    torch.testing.assert_close(trainer.uaps[0].delta.detach(), trainer.suspect["delta"])   # started from delta_3


def test_search_with_successive_halving_keeps_the_full_searchs_head(digits, image_adapter, small_model):
    from core.nft import targeted_perturbation_search

    clean, _ = image_adapter.clean_split(digits, 5, 0)
    model = _PlantedBackdoor(small_model)
    calls = []
    counting = torch.nn.Module.register_forward_hook(model, lambda *a: calls.append(1))
    full = targeted_perturbation_search(model, image_adapter, clean, (1, 8, 8), 0.1, "linf", 8, 32,
                                        torch.device("cpu"), torch.Generator().manual_seed(0))
    n_full = len(calls)
    calls.clear()
    halved = targeted_perturbation_search(model, image_adapter, clean, (1, 8, 8), 0.1, "linf", 8, 32,
                                          torch.device("cpu"), torch.Generator().manual_seed(0), keep=3)
    counting.remove()
    # 10 classes x 2 steps, then 3 x 6: 38 descent passes (+ 10 rankings after the quarter) instead of 80.
    assert (n_full, len(calls)) == (1 + 10 * 8 + 10, 1 + 10 * 2 + 10 + 3 * 6 + 10)
    assert sorted(r["class"] for r in halved) == list(range(10))
    head = {r["class"] for r in full[:2]}
    assert head <= {r["class"] for r in halved[:3]} and halved[0]["class"] == full[0]["class"] == 3
    for a in halved[:2]:   # the kept classes descended exactly as in the full search
        b = next(r for r in full if r["class"] == a["class"])
        assert torch.equal(a["delta"], b["delta"]) and a["loss"] == b["loss"]


def test_recover_ema_folds_the_moving_average_of_the_recovery_masks(digits, image_adapter, small_model, monkeypatch):
    clean, _ = image_adapter.clean_split(digits, 5, 0)   # 50 images: the recovery runs every step, no stop
    opts = {"steps": 6, "recover_steps": 8, "batch_size": 16}
    seen = []
    real_step = MaskTrainer.step

    def recording_step(self, x, y, step):
        out = real_step(self, x, y, step)
        if step >= opts["steps"]:
            seen.append(self.masks.state_dict())
        return out

    monkeypatch.setattr(MaskTrainer, "step", recording_step)
    ctx = DefenseContext(clean_per_class=5, show_progress=False)
    decay = 0.7
    res = NFT(**opts, recover_ema=decay).run(copy.deepcopy(small_model), image_adapter, clean, ctx)
    assert len(seen) == opts["recover_steps"]
    expected = {k: v.clone() for k, v in seen[0].items()}
    for masks in seen[1:]:
        for k in expected:
            expected[k] = decay * expected[k] + (1 - decay) * masks[k]
    for k, v in res.extras["masks"].items():
        assert torch.allclose(v, expected[k], atol=1e-6), k
        assert not torch.equal(v, seen[-1][k]) or torch.equal(seen[0][k], seen[-1][k])
    seen.clear()
    last = NFT(**opts).run(copy.deepcopy(small_model), image_adapter, clean, ctx)
    for k, v in last.extras["masks"].items():   # off: the last step's masks, as before
        assert torch.equal(v, seen[-1][k])
    with pytest.raises(ValueError, match="recover_ema is a decay per step"):
        NFT(**opts, recover_ema=1.0).run(copy.deepcopy(small_model), image_adapter, clean, ctx)


def test_recover_plain_augment_augments_the_plain_share_on_its_own_policy(image_adapter, small_model, monkeypatch):
    from core.nft import DEFAULTS, MaskTrainer

    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 4
    calls = []
    real = type(image_adapter).augment

    def recording(self, inputs, policy, generator=None):
        calls.append((len(inputs), policy))
        return real(self, inputs, policy, generator)

    monkeypatch.setattr(type(image_adapter), "augment", recording)

    def recovery_step(**opts):
        calls.clear()
        cfg = dict(DEFAULTS, steps=0, augment="weak", recover_augment="strong", recover_mixup=True, **opts)
        trainer = MaskTrainer(copy.deepcopy(small_model), image_adapter, cfg, x[:2], 2, torch.device("cpu"),
                              torch.Generator().manual_seed(0))
        trainer.step(x, y, 0)   # step 0 >= steps: a recovery step
        return list(calls)

    assert recovery_step(recover_mixup_frac=0.5) == [(8, "strong")]   # unset: one policy for the whole batch
    assert recovery_step(recover_mixup_frac=0.5, recover_plain_augment="weak") == [(4, "strong"), (4, "weak")]
    assert recovery_step(recover_mixup_frac=0.0, recover_plain_augment="weak") == [(8, "weak")]   # nothing mixed
    assert recovery_step(recover_mixup_frac=1.0, recover_plain_augment="weak") == [(8, "strong")]   # nothing plain
