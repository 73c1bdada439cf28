"""ISSBA: a sample-specific invisible residual from a steganography encoder trained in fit()."""
import pytest
import torch

from tests.modalities.image.attacks.image_attack_checks import (ADAPTER, build, check_pipeline, check_poisoning, check_range_shape,
                                 check_roundtrip, digits, random_images, tiny_bundle)  # noqa: F401

TINY = {"fit_steps": 150, "batch_size": 64, "width": 8, "secret_bits": 8, "lr": 3e-3}


@pytest.fixture(scope="module")
def fitted(digits):  # noqa: F811
    atk = build("issba", rate=0.1, **TINY)
    atk.fit(digits, ADAPTER, torch.device("cpu"))
    return atk


def test_residual_is_bounded_and_sample_specific(digits, fitted) -> None:  # noqa: F811
    x = digits.test.images[:32].float() / 255
    out = check_range_shape(fitted, x)
    r = out - x
    assert float(r.abs().max()) <= 0.1 + 1e-6 and float(r.abs().mean()) > 1e-4
    assert float((r[0] - r[1]).abs().mean()) > 1e-4  # each image gets its own residual


def test_decoder_reads_the_secret(digits, fitted) -> None:  # noqa: F811
    assert torch.equal(fitted.secret, build("issba", **TINY).secret)  # the code word comes from the seed
    assert not torch.equal(fitted.secret, build("issba", seed=1, **TINY).secret)
    assert fitted.bit_accuracy(digits.test.images[:64].float() / 255) > 0.7


@pytest.mark.parametrize("mode", ["all2one", "all2all"])
def test_poisoning(digits, fitted, mode) -> None:  # noqa: F811
    atk = build("issba", mode=mode, rate=0.1, **TINY)
    atk.load_state_dict(fitted.state_dict())
    check_poisoning(atk, digits.train.targets, digits.train.images.float() / 255)


def test_any_size_and_roundtrip(tmp_path, fitted) -> None:
    check_roundtrip(fitted, random_images((2, 1, 13, 7)), None, tmp_path)
    colour = build("issba", num_classes=3, **{**TINY, "fit_steps": 3})
    colour.fit(tiny_bundle(3, 11, 13), ADAPTER, torch.device("cpu"))
    for shape in [(2, 3, 11, 13), (1, 3, 32, 32), (1, 3, 5, 9)]:
        check_range_shape(colour, random_images(shape))
    with pytest.raises(ValueError, match="channel"):
        colour.apply(random_images((1, 1, 11, 13)))
    with pytest.raises(ValueError, match="secret_bits"):
        build("issba", secret_bits=4).load_state_dict(fitted.state_dict())


def test_pipeline_smoke(tmp_path, digits) -> None:  # noqa: F811
    run, atk = check_pipeline("issba", tmp_path, {"rate": 0.1, **{**TINY, "fit_steps": 5}}, bundle=digits)
    assert atk.secret.numel() == 8 and run.info()["n_poisoned"] > 0


def test_residual_weight_ramps_up_from_zero() -> None:
    # At full weight from the first step the Fashion-MNIST encoder collapsed to a zero residual
    # (bit accuracy 0.59); StegaStamp ramps the image loss in, and so does the fit here.
    atk = build("issba", lambda_img=10.0, fit_steps=100, lambda_ramp=0.5)
    weights = [atk.image_loss_weight(s) for s in (0, 25, 50, 99)]
    assert weights == pytest.approx([0.0, 5.0, 10.0, 10.0])
    assert build("issba", lambda_img=10.0, lambda_ramp=0).image_loss_weight(0) == 10.0
    with pytest.raises(ValueError, match="lambda_ramp"):
        build("issba", lambda_ramp=1.5)
