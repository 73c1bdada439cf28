"""Shared fixtures: tiny real data (scikit-learn's digits) and a small CNN."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("NFT_NO_PROGRESS", "1")
# One intra-op thread: float reductions then run in one order on every machine, so the measured
# outcomes the tests assert (e.g. AWM's ASR on digits: 17.7% with 2 threads vs < 10% with 1)
# do not depend on the runner's core count. The whole suite takes about 4 minutes this way.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def image_adapter():
    from modalities import get_modality

    return get_modality("image")


@pytest.fixture(scope="session")
def digits(image_adapter):
    return image_adapter.load_data({"name": "digits", "reserve_per_class": 30})


@pytest.fixture()
def small_model(image_adapter):
    torch.manual_seed(0)
    return image_adapter.build_model("small_cnn", 10, in_channels=1, width=8)
