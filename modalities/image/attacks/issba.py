"""ISSBA (Li et al., ICCV 2021): sample-specific invisible triggers from a steganography encoder.

A StegaStamp-style encoder/decoder pair is trained by the toolkit on the attacker's data:
the encoder takes an image and a bit string and outputs a bounded residual
(``max_residual * tanh``); the decoder must recover the bits from the encoded image. Losses:
bit BCE + ``lambda_img`` * residual L2 (the paper's LPIPS and critic terms are left out: no
pretrained perceptual network is available offline; the L2 term and the tanh bound keep the
residual small). The L2 weight ramps up from zero over the first ``lambda_ramp`` share of the
fit, as StegaStamp's does: at full weight from the first step the Fashion-MNIST encoder collapsed
to a zero residual before the decoder could read anything (bit accuracy 0.59, residual RMS 0.0006,
victim ASR 2.3%); with the ramp and 1,500 steps it reaches bit accuracy 0.99 at RMS 0.044.
The attack then encodes one fixed secret (from the seed) into every
poisoned image: the residual differs per image, but carries the same code.

The secret is broadcast to any image size by a linear map to a coarse grid that is
upsampled, so the encoder (a small U-Net) works for any size and channel count it was fitted on.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.adapter import Attack, DataBundle, Modality
from . import ATTACKS
from ._common import (ConvGenerator, batches, check_channels, generator, image_shape, load_module_state,
                      meta_tensor, meta_value, module_state, need, run_eval, seeded, take)

GRID = 4  # the secret is laid out on a GRID x GRID map, then upsampled to the image


class StegaEncoder(nn.Module):
    def __init__(self, channels: int, bits: int, width: int = 16, secret_channels: int = 4) -> None:
        super().__init__()
        self.secret_channels = secret_channels
        self.secret = nn.Linear(bits, secret_channels * GRID * GRID)
        self.body = ConvGenerator(channels + secret_channels, channels, width)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        s = self.secret(bits * 2 - 1).view(len(bits), self.secret_channels, GRID, GRID)
        s = F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([x - 0.5, s], 1))


class StegaDecoder(nn.Module):
    def __init__(self, channels: int, bits: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, 1, 1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(GRID))
        self.head = nn.Linear(2 * w * GRID * GRID, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5).flatten(1))


@ATTACKS.register("issba")
class ISSBA(Attack):
    name = "issba"

    def __init__(self, secret_bits: int = 32, max_residual: float = 0.1, lambda_img: float = 10.0,
                 fit_steps: int = 1500, batch_size: int = 32, lr: float = 3e-3, width: int = 16,
                 fit_max_samples: Optional[int] = 20000, lambda_ramp: float = 0.5, **kw: Any) -> None:
        super().__init__(secret_bits=secret_bits, max_residual=max_residual, lambda_img=lambda_img, fit_steps=fit_steps,
                         batch_size=batch_size, lr=lr, width=width, fit_max_samples=fit_max_samples,
                         lambda_ramp=lambda_ramp, **kw)
        if int(secret_bits) < 1 or not 0 < max_residual <= 1 or lambda_img < 0 or not 0 <= lambda_ramp <= 1:
            raise ValueError("issba needs secret_bits >= 1, max_residual in (0, 1], lambda_img >= 0 and "
                             "lambda_ramp in [0, 1]")
        self.lambda_ramp = float(lambda_ramp)
        self.secret_bits, self.max_residual, self.lambda_img = int(secret_bits), float(max_residual), float(lambda_img)
        self.fit_steps, self.batch_size, self.lr, self.width = int(fit_steps), int(batch_size), float(lr), int(width)
        self.fit_max_samples = fit_max_samples
        # the attacker's code word: fixed by the seed
        self.secret = torch.randint(0, 2, (self.secret_bits,), generator=generator(self.seed, 901)).float()
        self.encoder: Optional[StegaEncoder] = None
        self.decoder: Optional[StegaDecoder] = None
        self.channels = 0

    def _build(self, channels: int) -> None:
        self.channels = int(channels)
        with seeded(self.seed, 902):
            self.encoder = StegaEncoder(channels, self.secret_bits, self.width)
            self.decoder = StegaDecoder(channels, self.secret_bits, self.width)

    def residual(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return self.max_residual * torch.tanh(self.encoder(x, bits))

    def image_loss_weight(self, step: int) -> float:
        """The residual-L2 weight at fit step ``step``: linear from 0 to lambda_img over the ramp, then constant."""
        if self.lambda_ramp <= 0:
            return self.lambda_img
        return self.lambda_img * min(1.0, step / max(self.lambda_ramp * self.fit_steps, 1.0))

    def fit(self, bundle: DataBundle, adapter: Modality, device: torch.device) -> None:
        """Train the encoder/decoder on random secrets (so the code generalises to the attack's secret)."""
        c, _, _ = image_shape(bundle)
        self._build(c)
        data = take(adapter, bundle.train, self.fit_max_samples, self.seed, 903)
        enc, dec = self.encoder.to(device).train(), self.decoder.to(device).train()
        opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=self.lr)
        g = generator(self.seed, 904)
        for step, (x, _) in enumerate(batches(adapter, data, self.batch_size, self.fit_steps, self.seed, 905)):
            x = x.to(device)
            bits = torch.randint(0, 2, (len(x), self.secret_bits), generator=g).float().to(device)
            r = self.residual(x, bits)
            logits = dec((x + r).clamp(0, 1))
            loss = F.binary_cross_entropy_with_logits(logits, bits) + self.image_loss_weight(step) * r.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        enc.eval().requires_grad_(False)
        dec.eval().requires_grad_(False)

    def apply(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        need(self.encoder, self.name)
        check_channels(inputs, self.channels, self.name)
        bits = self.secret.to(inputs.device).expand(len(inputs), -1)
        r = self.max_residual * torch.tanh(run_eval(self.encoder, inputs, bits))
        return (inputs + r.to(inputs.dtype)).clamp(0.0, 1.0)

    @torch.no_grad()
    def bit_accuracy(self, inputs: torch.Tensor) -> float:
        """Share of the secret's bits the decoder recovers from triggered inputs (diagnostic)."""
        logits = run_eval(self.decoder, self.apply(inputs))
        return float(((logits > 0).float() == self.secret.to(logits.device)).float().mean())

    def state_dict(self) -> Dict[str, torch.Tensor]:
        if self.encoder is None:
            return {}
        return {**meta_tensor(channels=self.channels), "secret": self.secret.clone(),
                **module_state("encoder", self.encoder), **module_state("decoder", self.decoder)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self._build(meta_value(state, "channels", self.name))
        if "secret" in state:
            if state["secret"].numel() != self.secret_bits:
                raise ValueError(f"issba state holds a {state['secret'].numel()}-bit secret; build the attack with "
                                 f"secret_bits={state['secret'].numel()}")
            self.secret = state["secret"].float().cpu().clone()
        load_module_state("encoder", self.encoder, state, self.name)
        load_module_state("decoder", self.decoder, state, self.name)
        self.encoder.eval().requires_grad_(False)
        self.decoder.eval().requires_grad_(False)
