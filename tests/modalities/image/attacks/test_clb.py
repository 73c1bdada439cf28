"""Label-consistent backdoor: PGD-perturbed target-class images plus four corner patches."""
import pytest
import torch
import torch.nn.functional as F

from tests.modalities.image.attacks.image_attack_checks import (ADAPTER, SHAPES, build, check_pipeline, check_poisoning, check_range_shape,
                                 check_roundtrip, digits, random_images, tiny_bundle)  # noqa: F401

TINY = {"ref_steps": 30, "pgd_steps": 3, "patch_size": 2}


@pytest.fixture(scope="module")
def fitted(digits):  # noqa: F811
    atk = build("clb", target=0, rate=0.1, **TINY)
    atk.fit(digits, ADAPTER, torch.device("cpu"))
    return atk


@pytest.mark.parametrize("shape", SHAPES)
def test_trigger_is_four_corner_patches_only(shape) -> None:
    atk = build("clb", patch_size=2)
    x = random_images(shape)
    out = check_range_shape(atk, x)
    changed = (out != x).any(1)[0]
    h, w = shape[-2:]
    corners = torch.zeros(h, w, dtype=torch.bool)
    corners[:2, :2] = corners[:2, -2:] = corners[-2:, :2] = corners[-2:, -2:] = True
    assert not bool(changed[~corners].any())
    # the pattern is mirror-symmetric: it survives horizontal flips
    assert torch.equal(atk.apply(x.flip(-1)), out.flip(-1))
    assert set(out[:, :, corners].unique().tolist()) <= {0.0, 1.0}


def test_fit_perturbs_target_class_within_eps(digits, fitted) -> None:  # noqa: F811
    labels = digits.train.targets
    assert torch.equal(fitted.indices, fitted.poison_indices(labels))
    assert bool((labels[fitted.indices] == 0).all())
    assert fitted.delta_q.dtype == torch.int8
    assert int(fitted.delta_q.abs().max()) <= round(16 / 255 * 255)
    assert float(fitted.delta_q.float().abs().mean()) > 1.0  # PGD moved the images


def test_training_batch_keeps_labels_and_adds_perturbation(digits, fitted) -> None:  # noqa: F811
    idx = torch.arange(200)
    x, y = digits.train.images[idx].float() / 255, digits.train.targets[idx]
    flags = torch.zeros(200, dtype=torch.bool)
    flags[torch.isin(idx, fitted.indices)] = True
    assert bool(flags.any())
    px, py = fitted.training_batch(ADAPTER, x, y, idx, flags)
    assert torch.equal(py, y) and torch.equal(px[~flags], x[~flags])
    expected = fitted.apply((x[flags] + fitted.perturbation(idx[flags])).clamp(0, 1))
    assert torch.allclose(px[flags], expected)
    check_poisoning(fitted, digits.train.targets, digits.train.images.float() / 255)


def test_pgd_makes_samples_harder(digits) -> None:  # noqa: F811
    from modalities.image.attacks._common import train_reference_model
    from modalities.image.attacks.clb import pgd_untargeted

    model = train_reference_model(ADAPTER, digits, torch.device("cpu"), steps=40)
    x, y = digits.train.images[:64].float() / 255, digits.train.targets[:64]
    d = pgd_untargeted(model, ADAPTER, x, y, 16 / 255, 5, 4 / 255, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert F.cross_entropy(model(x + d), y) > F.cross_entropy(model(x), y)
    assert float(d.abs().max()) <= 16 / 255 + 1e-6 and float((x + d).min()) >= 0
    # a handed-in reference model is used as is
    atk = build("clb", rate=0.05, pgd_steps=2, patch_size=2)
    atk.use_reference_model(model)
    atk.fit(digits, ADAPTER, torch.device("cpu"))
    assert len(atk.indices) == len(atk.delta_q) > 0


def test_modes_and_roundtrip(tmp_path, fitted) -> None:
    with pytest.raises(ValueError, match="all2one"):
        build("clb", mode="all2all")
    x = random_images((2, 1, 8, 8))
    fresh = check_roundtrip(fitted, x, None, tmp_path)
    assert torch.equal(fresh.delta_q, fitted.delta_q) and torch.equal(fresh.indices, fitted.indices)
    with pytest.raises(RuntimeError, match="fit"):
        build("clb").perturbation(torch.tensor([0]))


def test_three_channel_fit() -> None:
    atk = build("clb", num_classes=3, rate=0.2, **TINY)
    atk.fit(tiny_bundle(3, 11, 13), ADAPTER, torch.device("cpu"))
    assert atk.delta_q.shape[1:] == (3, 11, 13)


def test_pipeline_smoke(tmp_path, digits) -> None:  # noqa: F811
    run, atk = check_pipeline("clb", tmp_path, {"rate": 0.1, **TINY}, bundle=digits)
    assert len(atk.indices) == run.info()["n_poisoned"] > 0


def test_robust_reference_option(digits) -> None:  # noqa: F811
    # The paper draws its perturbations from a robust model (an option here): the robust reference
    # keeps more of its accuracy under the same PGD than a standard one trained for as many steps.
    from modalities.image.attacks._common import train_reference_model
    from modalities.image.attacks.clb import pgd_untargeted, train_robust_reference

    assert build("clb").ref_adv_steps == 0 and build("clb", ref_adv_steps=5, ref_adv_eps=0.1).ref_adv_eps == 0.1
    with pytest.raises(ValueError, match="ref_adv_steps"):
        build("clb", ref_adv_steps=-1)
    cpu, eps = torch.device("cpu"), 0.1
    robust = train_robust_reference(ADAPTER, digits, cpu, arch="small_cnn", steps=80, eps=eps, pgd_steps=3, seed=0)
    plain = train_reference_model(ADAPTER, digits, cpu, steps=80)
    x, y = digits.test.images[:300].float() / 255, digits.test.targets[:300]

    def adv_acc(m):
        d = pgd_untargeted(m, ADAPTER, x, y, eps, 10, 2.5 * eps / 10, torch.Generator().manual_seed(1))
        with torch.no_grad():
            return float((m(x + d).argmax(1) == y).float().mean()), float((m(x).argmax(1) == y).float().mean())

    (rob_adv, rob_clean), (plain_adv, plain_clean) = adv_acc(robust), adv_acc(plain)
    assert rob_clean > 0.8 and rob_adv > plain_adv + 0.2
