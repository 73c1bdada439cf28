"""Every registered defense runs through the adapter alone, on every registered modality (Issue 4's contract).

A defense that reached past the adapter (an image-only op, a 4-D shape, a model attribute) would fail here on
video; a new defense or modality joins the grid by registering. Each run is a few steps on a few real samples:
what is checked is that the defense completes, returns a model of the same interface with finite outputs, and
leaves the caller's model untouched; whether it removes a backdoor is the per-defense tests' and benchmarks' job.
"""
from __future__ import annotations

import copy

import pytest
import torch

from core.defenses.base import DefenseContext
from core.pipeline import run_defense
from core.registry import DEFENSES, MODALITIES
from modalities import get_modality

# Just enough of each defense's loop to run every phase once or twice.
FEW_STEPS = {
    "nft": {"steps": 4, "recover_steps": 2, "adv_init": "random", "batch_size": 8},
    "ft": {"steps": 3, "batch_size": 8},
    "ft-sam": {"steps": 3, "batch_size": 8},
    "anp": {"iterations": 3, "batch_size": 8},
    "awm": {"outer": 1, "inner": 1, "batch_size": 8},
    "rnp": {"unlearn_epochs": 1, "recover_epochs": 1, "batch_size": 8},
    "i-bau": {"rounds": 1, "K": 1, "batch_size": 8},
    "nad": {"steps": 3, "teacher_steps": 3, "batch_size": 8},
    "fst": {"steps": 3, "batch_size": 8},
    "fp": {"steps": 3, "batch_size": 8},
}

# One small real-data case per modality: (data spec, architecture, its keyword arguments).
CASES = {
    "image": ({"name": "digits", "reserve_per_class": 30}, "small_cnn", {"in_channels": 1, "width": 8}),
    "video": ({"name": "moving-fashion", "num_classes": 4, "train_per_class": 20, "reserve_per_class": 6,
               "test_per_class": 4}, "small3d", {"in_channels": 1}),
}


def test_every_registered_defense_and_modality_has_a_case():
    assert set(DEFENSES.names()) == set(FEW_STEPS), "add the new defense's few-step options to FEW_STEPS"
    assert set(MODALITIES.names()) == set(CASES), "add the new modality's small case to CASES"


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    spec, arch, kwargs = CASES[request.param]
    adapter = get_modality(request.param)
    bundle = adapter.load_data(spec)
    clean, _ = adapter.clean_split(bundle, 3, seed=0)
    torch.manual_seed(0)
    model = adapter.build_model(arch, bundle.num_classes, **kwargs).eval()
    return adapter, bundle, clean, model


@pytest.mark.parametrize("name", sorted(FEW_STEPS))
def test_defense_runs_through_the_adapter(case, name):
    adapter, bundle, clean, model = case
    original = copy.deepcopy(model.state_dict())
    ctx = DefenseContext(seed=0, clean_per_class=3, show_progress=False)
    result, _ = run_defense(adapter, model, clean, name, dict(FEW_STEPS[name]), ctx)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items()), f"{name} changed its input model"
    x = next(iter(adapter.loader(bundle.test, 4)))[0]
    with torch.no_grad():
        out = adapter.forward(result.model.eval(), x)
    assert out.shape == (4, bundle.num_classes) and torch.isfinite(out).all()
