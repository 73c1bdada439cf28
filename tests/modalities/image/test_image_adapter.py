import pytest
import torch

from modalities.image.augment import augment_batch, parse_policy, random_crop
from modalities.image.data import FASHION_MNIST_ROOTS, read_idx
from modalities.image.models import MODELS


def test_digits_bundle_splits_are_disjoint_and_reserve_is_per_class(digits, image_adapter):
    assert digits.num_classes == 10
    assert digits.info["channels"] == 1 and digits.info["height"] == 8
    assert len(digits.reserve) == 300
    assert torch.bincount(digits.reserve.targets).tolist() == [30] * 10
    # the reserve never overlaps the attacker's training images
    tr = {tuple(x.flatten().tolist()) for x in digits.train.images}
    overlap = sum(tuple(x.flatten().tolist()) in tr for x in digits.reserve.images)
    assert overlap < 10  # digits has a few exact duplicate images; indices are disjoint by construction


def test_digits_upscaled_keep_split_labels_and_content(digits, image_adapter):
    big = image_adapter.load_data({"name": "digits", "reserve_per_class": 30, "size": 16})
    assert big.info["height"] == 16 and big.info["width"] == 16 and big.train.images.dtype == torch.uint8
    assert torch.equal(big.train.targets, digits.train.targets) and torch.equal(big.test.targets, digits.test.targets)
    # the same images, only larger: averaging 2x2 blocks gives back (a blurred) 8x8 digit
    down = torch.nn.functional.avg_pool2d(big.test.images[:50].float(), 2).flatten()
    assert torch.corrcoef(torch.stack([down, digits.test.images[:50].float().flatten()]))[0, 1] > 0.95


def test_clean_split_is_seeded_and_balanced(digits, image_adapter):
    a, ia = image_adapter.clean_split(digits, 5, seed=1)
    b, ib = image_adapter.clean_split(digits, 5, seed=1)
    c, ic = image_adapter.clean_split(digits, 5, seed=2)
    assert torch.equal(ia, ib) and not torch.equal(ia, ic)
    assert torch.bincount(a.targets).tolist() == [5] * 10
    with pytest.raises(ValueError, match="clean-per-class"):
        image_adapter.clean_split(digits, 31, seed=0)


def test_batched_fetch_returns_float_images_labels_indices(digits, image_adapter):
    batch = next(iter(image_adapter.loader(digits.train, 16)))
    x, y, idx = batch
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and torch.equal(idx, torch.arange(16))
    assert torch.equal(y, digits.train.targets[:16])


@pytest.mark.skipif(not any(__import__("os").path.exists(r) for r in FASHION_MNIST_ROOTS[:1]),
                    reason="Fashion-MNIST package not installed")
def test_fashion_mnist_idx_reader():
    x = read_idx(__import__("pathlib").Path(FASHION_MNIST_ROOTS[0]) / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000,) and x.max() == 9


@pytest.mark.parametrize("arch", ["preact_resnet18", "preact_resnet18_narrow", "resnet18_cifar", "small_cnn",
                                  "resnet18", "vgg16_bn", "mobilenet_v2"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_models_any_channels_and_size(arch, channels, size, image_adapter):
    kw = {"width": 0.125} if "preact" in arch or arch == "resnet18_cifar" else {}
    model = image_adapter.build_model(arch, 7, in_channels=channels, **kw).eval()
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7)
    units = image_adapter.maskable_units(model)
    assert units, "every model has maskable normalisation layers"
    assert all("normalize" not in u for u in units)


@pytest.mark.parametrize("arch", ["preact_resnet18", "preact_resnet18_narrow", "resnet18_cifar"])
def test_resnet_width_is_a_bounded_multiplier(arch, image_adapter):
    # small_cnn's width is a channel count; the same number given to a ResNet would build billions of weights
    with pytest.raises(ValueError, match="model.width 16 is a multiplier"):
        image_adapter.build_model(arch, 10, in_channels=1, width=16)


def test_reference_resnet18_mask_count():
    # The official code masks 19 BN layers of ResNet-18 (4,736 channels), not the stem BN.
    from core.masks import find_maskable_units

    model = MODELS.build("resnet18_cifar", num_classes=10, in_channels=3)
    units = find_maskable_units(model)
    mods = dict(model.named_modules())
    assert len(units) == 19 and "bn1" not in units
    assert sum(mods[u].num_features for u in units) == 4736


def test_augment_policies_are_seeded_and_keep_range():
    x = torch.rand(6, 1, 12, 12)
    for policy in ["weak", "strong", "noise_erase", "invert", "randaugment", "crop+flip"]:
        a = augment_batch(x, policy, torch.Generator().manual_seed(0))
        b = augment_batch(x, policy, torch.Generator().manual_seed(0))
        assert a.shape == x.shape and torch.equal(a, b)
        assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert parse_policy("strong") == ["crop", "flip", "noise_erase"]
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_policy("weak+blur")


def test_random_crop_is_a_shift():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    y = random_crop(x, torch.Generator().manual_seed(3), pad=2)
    assert float(y.sum()) == 1.0  # the pixel moved by at most 2 but was not lost


def test_pixel_mix_and_perturb_hook(image_adapter):
    a, b = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    mixed, lam = image_adapter.mix(a, b, 0.25)
    assert lam == 0.25 and torch.allclose(mixed, torch.full_like(a, 0.75))
    out = image_adapter.perturb(torch.full((2, 1, 4, 4), 0.9), torch.full((1, 4, 4), 0.5))
    assert float(out.max()) == 1.0  # kept in the valid pixel range
    assert image_adapter.perturbation_shape(a) == (1, 4, 4)


def test_cutmix_pastes_one_box_and_returns_the_kept_share(image_adapter):
    a, b = torch.zeros(3, 1, 10, 10), torch.ones(3, 1, 10, 10)
    mixed, lam = image_adapter.mix(a, b, 0.75, torch.Generator().manual_seed(0), mode="cutmix")
    pasted = mixed[0, 0]
    assert torch.equal(mixed, mixed[:1].expand_as(mixed))  # the same box for the whole batch
    rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
    assert float(pasted.sum()) == len(rows) * len(cols)  # one solid rectangle of b
    assert lam == pytest.approx(1 - float(pasted.mean())) and lam == pytest.approx(0.75)  # 5x5 box of 100 pixels


def test_mixup_cutmix_switches_between_the_two(image_adapter):
    a, b = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(20):
        mixed, lam = image_adapter.mix(a, b, 0.5, g, mode="mixup_cutmix")
        kinds.add("mixup" if torch.allclose(mixed, torch.full_like(a, 0.5)) else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_unknown_image_mix_mode_names_the_choices(image_adapter):
    with pytest.raises(ValueError, match="cutmix"):
        image_adapter.mix(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), 0.5, mode="halfmix")


def test_imagefolder_is_decoded_lazily_and_the_tools_error_names_what_to_use(tmp_path, image_adapter):
    from PIL import Image

    from modalities.image.data import ImageFolderDataset

    for cls, value in (("cat", 30), ("dog", 220)):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30), (value, value, value)).save(tmp_path / cls / "a.png")
    ds = ImageFolderDataset(str(tmp_path), size=16)
    x, y, i = ds[1]
    assert len(ds) == 2 and ds.classes == ["cat", "dog"] and x.shape == (3, 16, 16) and int(y) == 1 and int(i) == 1
    assert abs(float(x.mean()) - 220 / 255) < 1e-3
    with pytest.raises(ValueError, match="ImageFolderDataset"):
        image_adapter.load_data({"name": "imagefolder", "root": str(tmp_path)})
