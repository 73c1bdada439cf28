import pytest
import torch
from torch.nn.utils import parametrize

from core.defenses.awm import AWM


def test_defaults_follow_the_official_code():
    d = AWM.defaults
    assert (d["outer"], d["inner"], d["alpha"], d["gamma"], d["trigger_norm"], d["trigger_lr"], d["lr"],
            d["lr_decay"]) == (20, 5, 0.9, 1e-8, 1000.0, 10.0, 1e-2, 0.9)


def test_masks_fold_into_every_conv_weight(victim):
    res = victim.defend("awm", outer=1)
    assert res.info["layers"] == ["conv1", "conv2", "conv3"]
    assert type(res.model) is type(victim.model)
    assert not any(parametrize.is_parametrized(m) for m in res.model.modules())
    orig, new = victim.model.state_dict(), res.model.state_dict()
    assert orig.keys() == new.keys()
    for name, mask in res.extras["masks"].items():
        assert mask.shape == orig[f"{name}.weight"].shape                    # one mask per weight entry
        assert float(mask.min()) >= 0 and float(mask.max()) <= 1 and float(mask.min()) < 1
        assert torch.allclose(new[f"{name}.weight"], orig[f"{name}.weight"] * mask)
    for k in orig:
        if not any(k == f"{n}.weight" for n in res.extras["masks"]):
            assert torch.equal(orig[k], new[k]), k                           # nothing else moves
    assert all(p.requires_grad for p in res.model.parameters())


def test_layers_option_and_trigger_bound(victim):
    res = victim.defend("awm", outer=1, layers="linear", trigger_norm=0.5)
    assert res.info["layers"] == ["linear"]
    assert float(res.extras["trigger"]["last"].abs().sum()) <= 0.5 + 1e-5
    with pytest.raises(ValueError, match="layers"):
        victim.defend("awm", outer=1, layers="heads")


def test_deterministic_under_a_seed(victim):
    a, b = victim.defend("awm", outer=1), victim.defend("awm", outer=1)
    c = victim.defend("awm", outer=1, seed=2)
    assert victim.same_weights(a.model, b.model)
    assert not victim.same_weights(a.model, c.model)


def test_the_trigger_term_removes_the_backdoor(victim):
    # The official 20 outer rounds: after 5 the outcome depended on the CPU's float kernels (ASR < 10%
    # on the machine this was written on, 51% on an AVX512 one: seeds 0-2 there 51 / 12 / 39); after 20
    # rounds the AVX512 machine gives 3.0 / 10.1 / 9.1 (control without the trigger term: 69.7), an Intel
    # Xeon with AMX 19.7 / 13.1 / 8.1 (control 64.0 / 63.8 / 63.8; victim ASR 92.4): the bound is 25, and
    # the trigger term must beat the control by 30 points on the same CPU.
    awm = victim.evaluate(victim.defend("awm", outer=20).model)
    control = victim.evaluate(victim.defend("awm", outer=20, alpha=1.0).model)  # no adversarial-trigger loss
    assert awm["asr"] < 25 and awm["acc"] > 70, awm
    assert control["asr"] > 50 and control["asr"] > awm["asr"] + 30, (control, awm)
