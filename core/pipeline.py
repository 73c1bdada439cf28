"""The glue every tool shares: train a victim, load a run dir, purify, evaluate.

Written against the adapter only, so it serves every modality.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .adapter import Attack, DataBundle, Modality
from .config import deep_merge
from .defenses.base import Defense, DefenseContext, DefenseResult
from .metrics import summarize
from .registry import DEFENSES
from .rundir import RunDir, load_state_into, load_weights
from .train import train_classifier
from .utils import bf16_is_fast, pick_device, seed_everything


def load_bundle(adapter: Modality, cfg: Dict[str, Any]) -> DataBundle:
    """The experiment's data; the data spec is kept in ``bundle.info["spec"]`` for run dirs."""
    spec = dict(cfg.get("data") or {})
    bundle = adapter.load_data(spec)
    bundle.info.setdefault("spec", spec)
    return bundle


def spec_hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def victim_spec(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a config that determine a victim (its cache key)."""
    return {k: cfg.get(k) for k in ("modality", "data", "model", "attack", "train", "seed")}


def build_model(adapter: Modality, model_spec: Dict[str, Any], num_classes: int) -> nn.Module:
    spec = dict(model_spec)
    arch = spec.pop("arch", None)
    if not arch:
        raise ValueError("model spec needs an arch (e.g. model.arch=preact_resnet18_narrow)")
    return adapter.build_model(arch, num_classes, **spec)


def make_attack(adapter: Modality, cfg: Dict[str, Any], num_classes: int) -> Optional[Attack]:
    spec = cfg.get("attack")
    if not spec or not spec.get("name") or spec.get("name") == "none":
        return None
    spec = {"seed": cfg.get("seed", 0), **spec}
    return adapter.build_attack(spec, num_classes)


def train_victim(adapter: Modality, cfg: Dict[str, Any], out: str | Path, *, show_progress: bool = True,
                 bundle: Optional[DataBundle] = None) -> Tuple[nn.Module, RunDir, DataBundle]:
    """Train a (possibly backdoored) model from ``cfg`` and save it as a run dir."""
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    device = pick_device(cfg.get("device"))
    bundle = bundle or load_bundle(adapter, cfg)
    attack = make_attack(adapter, cfg, bundle.num_classes)
    flags = None
    if attack is not None:
        attack.fit(bundle, adapter, device)
        labels = adapter.labels_of(bundle.train)
        flags = torch.zeros(len(labels), dtype=torch.bool)
        flags[attack.poison_indices(labels)] = True
    model = build_model(adapter, cfg["model"], bundle.num_classes)
    t0 = time.perf_counter()
    trainer = getattr(attack, "train_victim", None)
    if trainer is not None:  # attacks that train jointly with the classifier (e.g. LIRA)
        log = trainer(model, adapter, bundle, cfg.get("train") or {}, flags=flags, device=device, seed=seed,
                      show_progress=show_progress)
    else:
        log = train_classifier(model, adapter, bundle.train, cfg.get("train") or {}, attack=attack, poison_flags=flags,
                               device=device, seed=seed, show_progress=show_progress)
    seconds = time.perf_counter() - t0
    metrics = adapter.evaluate(model, bundle.test, attack, device=device)
    run = RunDir(out)
    extras = {"attack": attack.state_dict()} if attack is not None and attack.state_dict() else {}
    info = {"kind": "victim", "modality": adapter.name, "config": cfg, "num_classes": bundle.num_classes,
            "data_info": bundle.info, "attack": attack.spec() if attack else None,
            "n_poisoned": int(flags.sum()) if flags is not None else 0, "train_seconds": seconds,
            "spec_hash": spec_hash(victim_spec(cfg))}
    run.save(model, info, metrics={"before": metrics} if attack else {"clean": metrics}, extra_tensors=extras)
    run.write_log(log)
    return model, run, bundle


def get_or_train_victim(adapter: Modality, cfg: Dict[str, Any], root: str | Path = "runs/victims",
                        show_progress: bool = True, bundle: Optional[DataBundle] = None) -> Tuple[nn.Module, RunDir]:
    """Victims are cached by the hash of what determines them."""
    run = cached_victim(cfg, root)
    if run is not None:
        model, _ = load_run_model(adapter, run)
        return model, run
    model, run, _ = train_victim(adapter, cfg, victim_dir(cfg, root), show_progress=show_progress, bundle=bundle)
    return model, run


def victim_dir(cfg: Dict[str, Any], root: str | Path = "runs/victims") -> Path:
    """Where the victim of ``cfg`` is cached: named by data, model, attack and the spec hash."""
    spec = victim_spec(cfg)
    return Path(root) / "-".join(str(x) for x in (cfg["data"].get("name"), cfg["model"].get("arch"),
                                                  (cfg.get("attack") or {}).get("name", "clean"), spec_hash(spec)))


def cached_victim(cfg: Dict[str, Any], root: str | Path = "runs/victims") -> Optional[RunDir]:
    """The cached victim run of ``cfg``, or None when it has not been trained yet."""
    run = RunDir(victim_dir(cfg, root))
    if run.exists() and run.info().get("spec_hash") == spec_hash(victim_spec(cfg)):
        return run
    return None


def load_run_model(adapter: Modality, run: RunDir) -> Tuple[nn.Module, Dict[str, Any]]:
    info = run.info()
    if info.get("modality") != adapter.name:
        raise ValueError(f"{run.path} holds a '{info.get('modality')}' model; use --modality {info.get('modality')}")
    model = build_model(adapter, info["config"]["model"], int(info["num_classes"]))
    load_state_into(model, run.weights(), source=f"weights in {run.path}")
    model.eval()
    return model, info


def load_outside_model(adapter: Modality, weights: str | Path, model_spec: Dict[str, Any], num_classes: int) -> nn.Module:
    """An outside model (safetensors, weights-only torch file or TorchScript) into an architecture."""
    model = build_model(adapter, model_spec, num_classes)
    state = load_weights(weights)
    own = model.state_dict()
    # Outside torchvision/timm weights lack our Normalize prefix: map them under it when that fits.
    if not any(k in own for k in state) and any(f"net.{k}" in own for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
    load_state_into(model, state, source=f"weights in {weights}")
    return model


def attack_from_run(adapter: Modality, run: RunDir, num_classes: int) -> Optional[Attack]:
    info = run.info()
    spec = info.get("attack")
    if not spec:
        return None
    attack = adapter.build_attack(dict(spec), num_classes)
    if (run.path / "attack.safetensors").is_file():
        attack.load_state_dict(run.tensors("attack"))
    return attack


def make_defense(adapter: Modality, name: str, options: Optional[Dict[str, Any]] = None,
                 preset: Optional[str] = None) -> Defense:
    """The defense ``name`` as it runs on this modality: its defaults, then the modality's measured
    settings (``adapter.defense_defaults``; skipped under a named preset), then ``options``."""
    merged = dict(options or {}) if preset else {**adapter.defense_defaults.get(name, {}), **(options or {})}
    return DEFENSES.get(name)(preset=preset, **merged)


@functools.cache
def _import_optimizers() -> None:
    """torch imports its compiler stack on the first optimizer built in a process (1.5 s here): not the defense's time."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)


def run_defense(adapter: Modality, model: nn.Module, clean: Any, name: str, options: Optional[Dict[str, Any]],
                ctx: DefenseContext, preset: Optional[str] = None) -> Tuple[DefenseResult, float]:
    defense = make_defense(adapter, name, options, preset)
    _import_optimizers()
    seed_everything(ctx.seed)
    t0 = time.perf_counter()
    result = defense.run(copy.deepcopy(model), adapter, clean, ctx)
    return result, time.perf_counter() - t0


SPEED_KEYS = ("autocast", "channels_last")


def speed_options(defense: Dict[str, Any], device: torch.device) -> Dict[str, bool]:
    """``defense.autocast`` (bf16) and ``defense.channels_last``: how every defense computes, not what.

    Off unless the config turns them on; ``autocast: auto`` is on where bf16 is fast on ``device``
    (:func:`core.utils.bf16_is_fast`). Any other value is refused here, before any work is done.
    """
    out = {}
    for key in SPEED_KEYS:
        value = defense.get(key, False)
        if value is None:
            value = False
        if key == "autocast" and value == "auto":
            value = bf16_is_fast(device)
        if not isinstance(value, bool):
            allowed = "true, false or auto" if key == "autocast" else "true or false"
            raise ValueError(f"defense.{key} must be {allowed}, got {value!r}; set it with --set defense.{key}=true")
        if key == "autocast" and value and not bf16_is_fast(device):
            warnings.warn(f"defense.autocast is on, but {device.type} has no native bf16 (AVX512-BF16/AMX or a bf16 GPU): "
                          "it will run slower than fp32 (8x on a CPU measured); use defense.autocast=auto", stacklevel=2)
        out[key] = value
    return out


def defense_speed(adapter: Modality, defense: Dict[str, Any]) -> Dict[str, Any]:
    """The speed keys a defense runs with before :func:`speed_options` resolves them: the modality's measured
    default for this defense (``adapter.defense_speed``; none under a named preset), then what the config sets
    (a key set to ``null`` counts as unset)."""
    name = defense.get("name", "nft")
    base = {} if defense.get("preset") else dict(adapter.defense_speed.get(name, {}))
    return {**base, **{k: defense[k] for k in SPEED_KEYS if defense.get(k) is not None}}


def speed_label(speed: Dict[str, bool]) -> str:
    """``bf16+channels_last``, ``fp32``, ...: how a row's defense computed (its seconds depend on it)."""
    return ("bf16" if speed.get("autocast") else "fp32") + ("+channels_last" if speed.get("channels_last") else "")


def purify_to_run(adapter: Modality, model: nn.Module, bundle: DataBundle, defense: Dict[str, Any],
                  out: Optional[str | Path], *, model_spec: Dict[str, Any], seed: int = 0,
                  device: Optional[torch.device] = None, attack: Optional[Attack] = None,
                  source: Optional[str] = None, show_progress: bool = True,
                  before: Optional[Dict[str, float]] = None, plots: bool = True) -> Dict[str, Any]:
    """Purify ``model`` with one defense on the defender's clean split; write a run dir; return a result row
    (plus ``model`` and ``defense_info``, which a caller pops before writing the row out).

    The defense sees only the model and clean data. ``attack`` (when known) is used for
    evaluation only.
    """
    device = device or pick_device(None)
    name = defense.get("name", "nft")
    per_class = int(defense.get("clean_per_class", 60))
    clean, idx = adapter.clean_split(bundle, per_class, seed)
    speed = speed_options(defense_speed(adapter, defense), device)
    if before is None:
        before = adapter.evaluate(model, bundle.test, attack, device=device)
    ctx = DefenseContext(device=device, seed=seed, clean_per_class=per_class, show_progress=show_progress, **speed)
    result, seconds = run_defense(adapter, model, clean, name, defense.get("options") or {}, ctx,
                                  preset=defense.get("preset"))
    after = adapter.evaluate(result.model, bundle.test, attack, device=device)
    row = {"defense": name, "preset": defense.get("preset") or "default", "clean_per_class": per_class,
           "seed": seed, **summarize(before, after), "seconds": seconds, "speed": speed_label(speed)}
    if out is not None:
        run = RunDir(out)
        info = {"kind": "purified", "modality": adapter.name, "source": source,
                "config": {"model": model_spec, "defense": defense, "seed": seed, "data": bundle.info.get("spec")},
                "num_classes": bundle.num_classes, "data_info": bundle.info,
                "attack": attack.spec() if attack is not None else None,
                "defense_info": result.info, "speed": speed, "clean_indices": idx.tolist(), "seconds": seconds}
        run.save(result.model, info, metrics={"before": before, "after": after, **{k: v for k, v in row.items()
                                                                                    if k in ("der", "seconds")}},
                 extra_tensors=result.extras)
        run.write_log(result.log)
        if plots and "masks" in result.extras:
            from .plots import plot_mask_distribution

            plot_mask_distribution(result.extras["masks"], run.plots / "masks.png",
                                   lower=result.info.get("lower_bounds"), title=f"{name} masks per layer")
        row["run_dir"] = str(run.path)
    # Objects for the caller, not CSV columns: the purified model and what the defense reported.
    row["model"], row["defense_info"] = result.model, result.info
    return row
