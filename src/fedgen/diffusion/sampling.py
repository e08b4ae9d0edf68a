"""Class-conditional sampling through diffusers schedulers.

- `ddpm`: the ancestral sampler of eq. (3), sigma_t^2 = beta_t or beta~_t (all T steps unless `steps`
  respaces it);
- `ddim`: deterministic DDIM (eta = 0), run as first-order DPM-Solver++, which is the same update
  (x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat; Lu et al. 2022): diffusers' DDIMScheduler takes the
  previous timestep as t - T // k, which is not the next timestep of its own trailing spacing when k does not
  divide T;
- `dpm-solver`: DPM-Solver++ (2nd-order multistep);
- `dpm-solver-3`: DPM-Solver++ (3rd-order multistep);
- `dpm-solver-sde`: SDE-DPM-Solver++ (2nd-order multistep, stochastic);
- `unipc`: UniPC (bh2, 2nd-order predictor-corrector; Zhao et al. 2023).
All run over the run's own betas and the same respaced timesteps, so a model trained once serves every sampler.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from torch import nn

from fedgen.config import DiffusionConfig
from fedgen.config.choices import SAMPLERS
from fedgen.core.errors import UsageError
from fedgen.diffusion.schedule import PREDICTION_TYPES, betas, ddpm_scheduler, respaced_timesteps

SIGMAS = ("beta", "beta-tilde")


class SamplingError(UsageError):
    """Sampling options that cannot be used together or with this model."""


def make_scheduler(cfg: DiffusionConfig, sampler: str = "ddpm", sigma: str | None = None, steps: int | None = None):
    """A diffusers scheduler for `sampler` over the run's betas, its timesteps set to `steps` respaced ones
    (`respaced_timesteps`: the first is always T - 1)."""
    scheduler = _new_scheduler(cfg, sampler, sigma)
    timesteps = respaced_timesteps(cfg.timesteps, resolve_steps(cfg, sampler, steps))
    if isinstance(scheduler, _RespacedUniPC):
        scheduler.set_respaced(timesteps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    return scheduler


class _RespacedUniPC(UniPCMultistepScheduler):
    """diffusers' UniPC, given explicit timesteps: its `set_timesteps` only spaces them itself (and its "trailing"
    spacing returns k + 1 timesteps for some k). The sigmas follow from the timesteps exactly as in diffusers."""

    def set_respaced(self, timesteps: list[int]) -> None:
        self.set_timesteps(len(timesteps))  # resets the multistep state for that many steps
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64)
        self.sigmas = torch.cat([sigmas[self.timesteps], torch.zeros(1)]).float()


def _new_scheduler(cfg: DiffusionConfig, sampler: str, sigma: str | None):
    if sampler == "ddpm":
        return ddpm_scheduler(cfg, sigma)
    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    trained = betas(cfg.schedule, cfg.timesteps).float().numpy()
    # with sample_max_value 1, dynamic thresholding is a clip of the predicted x_0 to [-1, 1]
    common = dict(num_train_timesteps=cfg.timesteps, trained_betas=trained,
                  prediction_type=PREDICTION_TYPES[cfg.prediction], final_sigmas_type="zero",
                  thresholding=cfg.clip_x0, sample_max_value=1.0)
    if sampler == "unipc":
        return _RespacedUniPC(solver_order=2, solver_type="bh2", predict_x0=True, **common)
    order = {"ddim": 1, "dpm-solver-3": 3}.get(sampler, 2)
    kind = "sde-dpmsolver++" if sampler == "dpm-solver-sde" else "dpmsolver++"
    return DPMSolverMultistepScheduler(algorithm_type=kind, solver_order=order, **common)


def resolve_steps(cfg: DiffusionConfig, sampler: str, steps: int | None) -> int:
    """Network evaluations per image: `steps`, else T for the ancestral sampler and 50 for the fast ones."""
    if steps is not None:
        return steps
    return cfg.timesteps if sampler == "ddpm" else min(50, cfg.timesteps)


def check_options(cfg: DiffusionConfig, *, sampler: str = "ddpm", steps: int | None = None,
                  sigma: str | None = None, guidance: float | None = None, null_label: int | None = None) -> int:
    """Validate sampling options before any work starts; returns the network evaluations per image."""
    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    resolved = resolve_steps(cfg, sampler, steps)
    if not 1 <= resolved <= cfg.timesteps:
        raise SamplingError(f"steps must be in [1, T={cfg.timesteps}], got {resolved}")
    if sigma is not None:
        if sampler != "ddpm":
            raise SamplingError(f"--sigma sets the ancestral (ddpm) sampler's variance; sampler {sampler!r} has none")
        if sigma not in SIGMAS:
            raise SamplingError(f"unknown sigma {sigma!r}; expected one of {', '.join(SIGMAS)}")
    guidance = cfg.guidance if guidance is None else guidance
    if guidance < 0:
        raise SamplingError(f"guidance must be >= 0, got {guidance}")
    if guidance != 1.0 and null_label is None:
        raise SamplingError("classifier-free guidance needs a model trained with train.label_dropout > 0")
    return resolved


@torch.no_grad()
def sample(
    model: nn.Module,
    cfg: DiffusionConfig,
    labels: torch.Tensor,
    image_shape: tuple[int, int, int],
    *,
    seed: int = 0,
    sampler: str = "ddpm",
    steps: int | None = None,
    sigma: str | None = None,
    guidance: float | None = None,
    null_label: int | None = None,
    batch_size: int = 256,
    bf16: bool = False,
    progress=None,
) -> torch.Tensor:
    """Draw one image per label, in [-1, 1] (clamped at the end only), shape (N, C, H, W).

    Starts from x_T ~ N(0, I). `steps` network evaluations per image (default: T for ddpm, 50 otherwise).
    `progress`, if given, is called with the batch size after each network evaluation of a batch (so the total
    is `len(labels) * resolve_steps(...)`).
    Classifier-free guidance (w = `guidance`, default the config's) uses eps_null + w (eps_y - eps_null), with
    `null_label` the class the model was trained on for dropped labels; w = 1 is the plain conditional model.
    `bf16`: the network runs under bfloat16 autocast (the scheduler's arithmetic stays float32).
    """
    steps = check_options(cfg, sampler=sampler, steps=steps, sigma=sigma, guidance=guidance, null_label=null_label)
    guidance = cfg.guidance if guidance is None else guidance
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for chunk in labels.split(batch_size):
        scheduler = make_scheduler(cfg, sampler, sigma, steps)
        noisy = "generator" in inspect.signature(scheduler.step).parameters  # UniPC's step takes none
        x = torch.randn((len(chunk), *image_shape), generator=generator).to(device) * scheduler.init_noise_sigma
        y = chunk.to(device)
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if guidance == 1.0:
                    pred = model(x_in, t.to(device).expand(len(chunk)), class_labels=y).sample.float()
                else:
                    both = model(torch.cat([x_in, x_in]), t.to(device).expand(2 * len(chunk)),
                                 class_labels=torch.cat([y, torch.full_like(y, null_label)])).sample.float()
                    pred_y, pred_null = both.chunk(2)
                    pred = pred_null + guidance * (pred_y - pred_null)  # linear: the same in eps or v
            x = (scheduler.step(pred, t, x, generator=generator) if noisy else scheduler.step(pred, t, x)).prev_sample
            if progress is not None:
                progress(len(chunk))
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
