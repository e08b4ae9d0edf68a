"""The config's schema: pydantic sections with their defaults and the checks that span sections (a setting a run
would ignore is an error)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedgen.config.choices import DISCRIMINATORS, CompressionName, DatasetName, SamplerName, StrategyName
from fedgen.core.errors import FedgenError


class ConfigError(FedgenError, ValueError):
    """A config that cannot be used; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: DatasetName = "fashion-mnist"
    path: str | None = Field(None, description="dataset location; default: $FEDGEN_DATA/<dataset> or the Debian path")
    image_size: int | None = Field(None, ge=4, description="resize to this side (None: native size)")
    channels: Literal[1, 3] | None = None
    hflip: bool = Field(False, description="random horizontal flip during training (the paper, CIFAR-10)")
    max_train_samples: int | None = Field(
        None, ge=1, description="stratified seeded subset of the training split (None: all)"
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share for datasets without a test split")
    split_seed: int = Field(
        0, description="seed of that held-out split: part of the dataset's definition, independent of train.seed, "
        "so runs of any seed are evaluated on the same test images"
    )
    partition: Literal["dirichlet", "iid"] = "dirichlet"
    beta: float = Field(0.5, gt=0, description="Dirichlet concentration; small = very non-IID")


class ModelConfig(_Section):
    arch: Literal["tiny", "cpu-small", "paper", "custom"] = "cpu-small"
    block_out_channels: tuple[int, ...] | None = Field(None, description="only for arch='custom'")
    layers_per_block: int | None = Field(None, ge=1, description="only for arch='custom'")
    attention_levels: tuple[int, ...] | None = Field(
        None, description="indices of down levels with self-attention (arch='custom')"
    )


class DiffusionConfig(_Section):
    timesteps: int = Field(300, ge=2, description="T")
    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="linear: DDPM's [1e-4, 0.02] rescaled by 1000/T so that alpha_bar_T ~ 0"
    )
    prediction: Literal["epsilon", "v", "x0"] = Field(
        "epsilon", description="what the U-Net predicts: epsilon (the paper, eq. 2), v = sqrt(abar) eps - "
        "sqrt(1 - abar) x0 (Salimans & Ho 2022) or x0, the clean image"
    )
    min_snr_gamma: float | None = Field(
        None, gt=0, description="weight each image's loss by min-SNR-gamma (Hang et al. 2023; 5 in the paper): "
        "min(SNR(t), gamma)/SNR(t) for epsilon, /(SNR(t)+1) for v, min(SNR(t), gamma) for x0; None: eq. (2)'s "
        "uniform weights"
    )
    timestep_sampling: Literal["uniform", "log-normal"] = Field(
        "uniform", description="how training draws t: uniform on 1..T (eq. 2), or log-normal in the noise level "
        "sigma_t = sqrt((1 - abar_t) / abar_t), ln sigma ~ N(lognormal_mean, lognormal_std^2), rounded to the "
        "nearest of the T levels (EDM's training distribution, Karras et al. 2022)"
    )
    lognormal_mean: float = Field(-1.2, description="log-normal timestep sampling: the mean of ln sigma (EDM)")
    lognormal_std: float = Field(1.2, gt=0, description="log-normal timestep sampling: the sd of ln sigma (EDM)")
    sigma: Literal["beta", "beta-tilde"] = Field("beta-tilde", description="ancestral sampler variance, eq. (3)")
    guidance: float = Field(
        1.0, ge=0, description="classifier-free guidance scale w (1: plain conditional; needs train.label_dropout)"
    )
    clip_x0: bool = Field(
        True, description="clip the predicted x_0 to [-1, 1] at each sampling step (DDPM's reference code); "
        "false: eq. (3) literally"
    )


class FLConfig(_Section):
    clients: int = Field(10, ge=1, description="N")
    clients_per_round: int | None = Field(None, ge=1, description="K (None: all N)")
    rounds: int = Field(300, ge=1, description="R")
    local_epochs: int = Field(5, ge=1, description="E")
    centralized: bool = Field(False, description="train one model on the union of the data for R x E epochs")
    min_clients: int = Field(
        1, ge=1, description="a round completes when at least this many sampled clients returned a usable update "
        "(the others are logged as missing or rejected); fewer stop the run with the last checkpoint intact"
    )
    max_update_norm_ratio: float = Field(
        10.0, gt=1, description="reject an update whose distance from the global weights exceeds this many times "
        "the median of the round's others (needs 3 or more updates)"
    )
    strategy: StrategyName = Field(
        "fedavg", description="fedavg; server optimisers on the pseudo-gradient (Reddi et al. 2021): fedavgm, "
        "fedadam, fedyogi, fedadagrad; client remedies: fedprox (proximal term), scaffold (control variates, "
        "option II)"
    )
    server_lr: float | None = Field(
        None, gt=0, description="server learning rate on the pseudo-gradient (None: 1 for fedavg, fedavgm, fedprox "
        "and scaffold, where 1 is plain averaging; 0.01 for fedadam, fedyogi, fedadagrad)"
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: the server's momentum")
    server_betas: tuple[float, float] = Field((0.9, 0.99), description="fedadam, fedyogi: (beta1, beta2)")
    server_tau: float = Field(1e-3, gt=0, description="fedadam, fedyogi, fedadagrad: adaptivity tau (the "
                              "optimiser's eps)")
    prox_mu: float = Field(0.01, ge=0, description="fedprox: mu of the proximal term mu/2 |theta - theta_g|^2")
    compression: CompressionName = Field(
        "none", description="what a silo sends back: none, its local weights (float32, lossless); fp16, its update "
        "in half precision; int8, its update quantised per tensor (1 byte a parameter), both with error feedback "
        "kept at the silo (off under client-dp)"
    )

    @model_validator(mode="after")
    def _k_le_n(self) -> FLConfig:
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ValueError(
                f"fl.clients_per_round ({self.clients_per_round}) exceeds fl.clients ({self.clients})"
            )
        return self

    @model_validator(mode="after")
    def _betas(self) -> FLConfig:
        if not all(0 <= b < 1 for b in self.server_betas):
            raise ValueError(f"fl.server_betas {self.server_betas}: each must be in [0, 1)")
        return self

    @property
    def server_learning_rate(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return 1e-2 if self.strategy in ("fedadam", "fedyogi", "fedadagrad") else 1.0

    @property
    def k(self) -> int:
        return self.clients if self.clients_per_round is None else self.clients_per_round


class TrainConfig(_Section):
    batch_size: int = Field(512, ge=1)
    lr: float = Field(2e-4, gt=0)
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    bf16: bool = Field(False, description="bfloat16 autocast for the network (fast on CPUs with AMX)")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch CPU threads of the run's work, at the silos and the coordinator (None: the "
        "process default). CPU results are bit-identical across runtimes for equal thread counts"
    )
    lr_decay_rounds: int | None = Field(
        None, ge=2, description="FedDM: cosine decay of the local learning rate over the first this many rounds, "
        "from train.lr to train.lr_final_ratio * train.lr, constant after (a function of the round alone, so "
        "extending fl.rounds keeps it); None: constant"
    )
    lr_final_ratio: float = Field(0.1, ge=0, le=1, description="the decay's end, as a share of train.lr")
    warmup_steps: int = Field(
        0, ge=0, description="FedDM: linear warm-up of the local learning rate over the first this many optimiser "
        "steps of every local update (each round starts a fresh Adam, whose first steps move every weight by "
        "about the learning rate); 0: none"
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="FedDM: the local Adam's (beta1, beta2)")
    label_dropout: float = Field(
        0.0, ge=0, lt=1, description="share of training labels replaced by a null class (enables classifier-free "
        "guidance)"
    )
    ema_decay: float = Field(
        0.998, ge=0, lt=1, description="FedDM: EMA of the global weights, updated by the server after each "
        "aggregation (decay min(ema_decay, (1+n)/(10+n)) at update n); sample/evaluate use it by default; 0: off"
    )

    @model_validator(mode="after")
    def _adam_betas(self) -> TrainConfig:
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas {self.adam_betas}: each must be in [0, 1)")
        return self


class LogConfig(_Section):
    sample_every: int = Field(0, ge=0, description="write a sample grid every k rounds (0: only at the end)")
    samples_per_class: int = Field(8, ge=1)
    loss_eval_samples: int = Field(
        256, ge=0, description="images per client and of the test set for the per-round loss (fixed t, noise)"
    )
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = Field(False, description="also log the per-round scalars and sample grids for TensorBoard, "
                                                 "in RUN/tensorboard (needs the tensorboard extra)")


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="evaluate the global model every k rounds during training (0: never)")
    samples: int | None = Field(None, ge=10, description="generated images for FID etc. (None: test-set size)")
    # SDE-DPM-Solver++ at 10 steps under bf16: on the default job's EMA model (n=2000, docs/PERFORMANCE.md) domain
    # FID 16.2 where the 200-step ancestral sampler gets 14.6 and the previous default (ancestral, 25 steps) 19.9;
    # 15 steps reach 13.8 (better than 200-step ancestral) but put a 10,000-image evaluation past 5 minutes on
    # 2 CPU cores
    sampler: SamplerName = "dpm-solver-sde"
    steps: int | None = Field(10, ge=1, description="network evaluations per image (None: T for ddpm, else 50)")
    bf16: bool = Field(True, description="sample with the network under bfloat16 autocast (2.1x the network "
                       "evaluations per second on this project's CPUs, domain FID +1.9% on the default job)")
    tstr: bool = Field(False, description="also train-on-synthetic/test-on-real")
    tstr_samples: int | None = Field(None, ge=10, description="synthetic training images (None: train-set size)")
    classifier_epochs: int = Field(4, ge=1, description="epochs of the evaluation CNN (domain features and TSTR)")
    inception_weights: str | None = Field(
        None, description="local FID Inception weights file (else $FEDGEN_INCEPTION_WEIGHTS); none: domain only"
    )


class PGAConfig(_Section):
    """Private generator aggregation (Han & Xue 2020; docs/DESIGN.md): one generator against the parties' own
    discriminators. A round is `steps_per_round` generator steps; every step sends one message to each party."""

    discriminators: list[str] = Field(
        ["dcgan"], min_length=1, description="one discriminator kind per party, or one kind for all "
        "(dcgan, resnet, wide, mlp, tiny)"
    )
    steps_per_round: int = Field(100, ge=1, description="generator steps per round (checkpoint and log unit)")
    noise_ratio: float = Field(0.5, ge=0, description="sigma_i = noise_ratio * d_i on each party's loss "
                               "(heuristic, no formal privacy guarantee); 0 turns it off")
    aggregation: Literal["ratio", "mean", "literal"] = Field(
        "ratio", description="ratio: representative's gradient scaled by mean(noised)/L_r (clamped to rho_max); "
        "mean: mean of all parties' gradients; literal: representative's gradient alone"
    )
    rho_max: float = Field(5.0, gt=0, description="upper clamp of the ratio aggregation's scale")
    z_dim: int = Field(100, ge=1)
    width: int = Field(64, ge=4, description="generator base width")
    lr_generator: float = Field(2e-4, gt=0)
    lr_discriminator: float = Field(2e-4, gt=0)
    loss: Literal["gan", "acgan"] = Field(
        "gan", description="gan: each discriminator sees image and label, non-saturating BCE (the paper); acgan: "
        "each discriminator sees the image alone and also classifies it (an auxiliary classifier trained on the "
        "party's real images; Odena et al. 2017), and g_i adds that classifier's cross-entropy on the fakes' labels"
    )
    adversarial: Literal["bce", "hinge"] = Field(
        "bce", description="the real-vs-fake loss: bce, the non-saturating GAN loss (the paper); hinge: each "
        "discriminator minimises relu(1 - D(real)) + relu(1 + D(fake)) and g_i = -D(fake) (Lim & Ye 2017; "
        "SN-GAN's loss). With hinge, g_i is signed: use pga.aggregation mean or literal, not ratio"
    )
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the generator's weights (and BatchNorm "
                             "statistics), updated after every generator step with decay min(ema_decay, (1+n)/(10+n)) "
                             "at step n; sample/evaluate use it (--raw: the generator itself); 0: off (the paper)")
    spectral_norm: bool = Field(False, description="spectral normalisation of every convolution and linear layer "
                                "of each party's discriminator (Miyato et al. 2018); not with privacy.mode=dp-sgd")
    mode_seeking: float = Field(0.0, ge=0, description="weight of the mode-seeking term (MSGAN, Mao et al. "
                                "2019) in the generator's update: fake batch 2 is drawn in pairs of one label and "
                                "two z, and the generator also minimises 1 / (mean |G(z1)-G(z2)| / mean |z1-z2| + "
                                "1e-5), so different z give different images of a class; computed at the "
                                "coordinator, the parties see nothing new; 0: off (the paper)")
    diffaugment: bool = Field(False, description="each party shifts (up to 1/8 of the side) and cuts out (a square "
                              "of half the side) every image its discriminator sees, real and generated, "
                              "differentiably (DiffAugment, Zhao et al. 2020)")


class MERFConfig(_Section):
    """DP-MERF (Harder et al. 2021; docs/DESIGN.md): each silo releases its class-conditional sum of random Fourier
    features once; the coordinator trains the generator to match their sum. A round is `steps_per_round`
    generator steps at the coordinator (no messages after the first)."""

    features: int = Field(6000, ge=2, description="random Fourier features, split equally between the "
                          "bandwidths (a multiple of 2 x their number): more approximate the kernel better, at a "
                          "cost per generator step")
    bandwidths: list[float] = Field(
        [0.28, 0.56, 1.12], min_length=1, description="the Gaussian kernels' length scales per sqrt(pixel values): "
        "l = b * sqrt(C*H*W) on images in [-1, 1]; several: their mean kernel. The default is 0.35, 0.7 and 1.4 "
        "times the median distance between Fashion-MNIST training images (23.0 = 0.8 sqrt(784))")
    steps_per_round: int = Field(100, ge=1, description="generator steps per round (checkpoint and log unit)")
    z_dim: int = Field(100, ge=1)
    width: int = Field(64, ge=4, description="generator base width")
    lr: float = Field(1e-3, gt=0, description="the generator's Adam learning rate")


class RuntimeConfig(_Section):
    """Where clients run. None of it changes what a run computes, so it may change on an existing run."""

    round_timeout_s: float = Field(600.0, gt=0, description="Flower: how long a round waits for replies")
    message_ttl_s: float | None = Field(None, gt=0, description="Flower: message lifetime (None: the round timeout)")
    wait_for_nodes_s: float = Field(120.0, gt=0, description="Flower: how long to wait for every silo at start")
    link_timeout_s: float = Field(120.0, gt=0, description="Flower deployment: how long the ServerApp and `fedgen "
                                  "train --runtime flower` wait for a SuperLink that stopped answering before they "
                                  "stop with an error (the run resumes with the same command once it is back)")
    sim_cpus_per_client: float = Field(1.0, gt=0, description="flower-sim: CPUs reserved per virtual client")
    sim_cpus: int | None = Field(None, ge=1, description="flower-sim: CPUs given to Ray (None: all)")


class PrivacyConfig(_Section):
    """Formal differential privacy (docs/DESIGN.md, Privacy). The noise multiplier is solved from
    `target_epsilon` over the whole run, or given as `noise_multiplier`."""

    mode: Literal["none", "dp-sgd", "client-dp", "dp-release"] = Field(
        "none", description="none: no formal guarantee; dp-sgd: record-level DP-SGD (Opacus) in every silo; "
        "client-dp: client-level DP-FedAvg (clipped updates, Gaussian noise at the server); dp-release: "
        "record-level, algorithm=merf: each silo noises its one release (the Gaussian mechanism)"
    )
    target_epsilon: float | None = Field(None, gt=0, description="epsilon to reach at the end of fl.rounds")
    noise_multiplier: float | None = Field(None, gt=0, description="sigma, instead of target_epsilon")
    delta: float = Field(1e-5, gt=0, lt=1, description="must be below 1/|D_i| (dp-sgd) or 1/N (client-dp)")
    max_grad_norm: float = Field(1.0, gt=0, description="C: per-record gradient clip (dp-sgd) or per-client "
                                 "update clip (client-dp)")
    accountant: Literal["prv", "rdp"] = Field("prv", description="Opacus's PRV or RDP accountant")
    noise_multiplicity: int = Field(1, ge=1, description="dp-sgd, FedDM: noise draws (t, eps) per image, "
                                    "averaged before clipping (DPDM); costs compute, not privacy")

    @model_validator(mode="after")
    def _budget(self) -> PrivacyConfig:
        if self.mode != "none" and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(f"privacy.mode={self.mode} needs exactly one of privacy.target_epsilon and "
                             "privacy.noise_multiplier")
        return self


class Config(_Section):
    name: str = "fedgen"
    description: str = ""
    algorithm: Literal["feddm", "pga", "merf"] = Field(
        "feddm", description="feddm: federated diffusion (FedAvg of a DDPM); pga: private generator aggregation (a "
        "GAN); merf: DP-MERF, a generator matched to the silos' one-shot random-feature embeddings")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    fl: FLConfig = FLConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()
    pga: PGAConfig = PGAConfig()
    merf: MERFConfig = MERFConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _privacy_fits(self) -> Config:
        mode = self.privacy.mode
        if self.algorithm == "merf" and mode in ("dp-sgd", "client-dp"):
            raise ValueError(f"privacy.mode={mode}: DP-MERF trains nothing at the silos; each releases its "
                             "embedding once (use privacy.mode=dp-release)")
        if mode == "dp-release" and self.algorithm != "merf":
            raise ValueError(f"privacy.mode=dp-release is DP-MERF's one-shot release (algorithm=merf); "
                             f"algorithm={self.algorithm} trains at the silos: use dp-sgd")
        if mode != "client-dp":
            return self
        if self.algorithm == "pga":
            raise ValueError("privacy.mode=client-dp clips and noises weight updates; PGA sends none (use dp-sgd)")
        if self.fl.centralized:
            raise ValueError("privacy.mode=client-dp needs clients: the centralized baseline has one (use dp-sgd)")
        if self.privacy.delta >= 1 / self.fl.clients:
            raise ValueError(f"privacy.delta={self.privacy.delta:g} is not below 1/N = 1/{self.fl.clients}")
        return self

    @model_validator(mode="after")
    def _strategy_fits(self) -> Config:
        strategy = self.fl.strategy
        if self.fl.compression != "none" and self.fl.centralized:
            raise ValueError(f"fl.compression={self.fl.compression} with fl.centralized: the centralized baseline "
                             "stands for one party holding all the data, nothing travels (leave fl.compression=none)")
        if strategy == "fedavg":
            return self
        if self.trains_generator:
            raise ValueError(f"fl.strategy={strategy} changes how weights are averaged or trained locally; "
                             f"algorithm={self.algorithm} averages no weights (leave fl.strategy=fedavg)")
        if self.fl.centralized:
            raise ValueError(f"fl.strategy={strategy}: the centralized baseline has one client and no aggregation "
                             "(leave fl.strategy=fedavg)")
        if strategy == "scaffold" and self.privacy.mode == "client-dp":
            raise ValueError("fl.strategy=scaffold with privacy.mode=client-dp: each client would also send its "
                             "control-variate change, a second per-client release that client-level DP neither "
                             "clips nor noises (use dp-sgd, under which it is post-processing)")
        return self

    @model_validator(mode="after")
    def _nothing_ignored(self) -> Config:
        """A value the run would not use is an error, naming what to set instead: a setting silently ignored
        (a privacy target without a privacy mode, above all) lets a user believe in a run that is not the one
        trained. Values equal to their defaults are not "set"."""
        problems = [f"  {key}: {why}" for key, why in ignored_settings(self)]
        if problems:
            raise ValueError("settings this run would ignore:\n" + "\n".join(problems))
        return self

    @property
    def trains_generator(self) -> bool:
        """PGA and DP-MERF train a GAN generator (nn/gan.py); FedDM a diffusion U-Net."""
        return self.algorithm in ("pga", "merf")

    @model_validator(mode="after")
    def _merf_fits(self) -> Config:
        if self.algorithm != "merf":
            return self
        if self.merf.features % (2 * len(self.merf.bandwidths)) or min(self.merf.bandwidths) <= 0:
            raise ValueError(f"merf.features={self.merf.features}: must be a multiple of 2 x "
                             f"{len(self.merf.bandwidths)} bandwidths (a cosine and a sine per frequency, as many "
                             "per bandwidth), and every bandwidth positive")
        if self.fl.centralized:
            raise ValueError("fl.centralized is a FedDM baseline; DP-MERF's sum over silos is already the "
                             "centralized embedding")
        if self.fl.clients_per_round not in (None, self.fl.clients):
            raise ValueError("merf: every silo releases once, in round 1 (leave fl.clients_per_round unset)")
        return self

    @model_validator(mode="after")
    def _pga_fits(self) -> Config:
        if self.algorithm != "pga":
            return self
        kinds = self.pga.discriminators
        if len(kinds) not in (1, self.fl.clients):
            raise ValueError(f"pga.discriminators names {len(kinds)} kinds: give one per party "
                             f"(fl.clients={self.fl.clients}) or one for all")
        unknown = [k for k in kinds if k not in DISCRIMINATORS]
        if unknown:
            raise ValueError(f"pga.discriminators: unknown {unknown}; expected {', '.join(DISCRIMINATORS)}")
        if self.fl.centralized:
            raise ValueError("fl.centralized is a FedDM baseline; PGA's baselines are in `fedgen evaluate --tstr`")
        if self.fl.clients_per_round not in (None, self.fl.clients):
            raise ValueError("pga: every party takes part in every step (leave fl.clients_per_round unset)")
        if self.pga.spectral_norm and self.privacy.mode == "dp-sgd":
            raise ValueError("pga.spectral_norm with privacy.mode=dp-sgd: Opacus computes per-sample gradients "
                             "of a layer's own weight, not through the parametrisation spectral normalisation puts "
                             "on it; turn one of them off")
        if self.pga.adversarial == "hinge" and self.pga.aggregation == "ratio":
            raise ValueError("pga.adversarial=hinge with pga.aggregation=ratio: the ratio divides the noised mean "
                             "by the representative's loss, and the hinge generator loss -D(fake) has no sign "
                             "(set pga.aggregation to mean or literal)")
        return self


def _changed(section: BaseModel, *names: str) -> list[str]:
    """The fields of `section` among `names` (all if none) whose value differs from the section's default."""
    default = type(section)()
    return [n for n in (names or type(section).model_fields) if getattr(section, n) != getattr(default, n)]


# FedDM-only settings (PGA trains a GAN: no diffusion, no U-Net, no weight averaging)
_FEDDM_ONLY = {"model": (), "diffusion": (), "train": ("lr", "bf16", "label_dropout", "ema_decay", "lr_decay_rounds",
                                                       "lr_final_ratio"),
               "fl": ("local_epochs", "max_update_norm_ratio", "compression"), "eval": ("sampler", "steps", "bf16"),
               "log": ("loss_eval_samples",)}
# the server-optimiser and remedy settings, by the strategies that read them
_STRATEGY_KEYS = {"server_momentum": ("fedavgm",), "server_betas": ("fedadam", "fedyogi"),
                  "server_tau": ("fedadam", "fedyogi", "fedadagrad"), "prox_mu": ("fedprox",)}


def ignored_settings(cfg: Config) -> list[tuple[str, str]]:
    """(key, what to do) for every value `cfg` sets that its privacy mode, algorithm, strategy or dataset does
    not use."""
    out: list[tuple[str, str]] = []
    p = cfg.privacy
    if p.mode == "none":
        for name in _changed(p, "target_epsilon", "noise_multiplier", "delta", "max_grad_norm", "accountant",
                             "noise_multiplicity"):
            out.append((f"privacy.{name}", "used only with a privacy mode: set privacy.mode=dp-release (DP-MERF's "
                                           "record-level release)" if cfg.algorithm == "merf" else
                        "used only with a privacy mode: set privacy.mode=dp-sgd (record-level, in each silo) or "
                        "privacy.mode=client-dp"))
    else:
        if _changed(p, "noise_multiplicity") and (p.mode != "dp-sgd" or cfg.algorithm != "feddm"):
            out.append(("privacy.noise_multiplicity", "used only by FedDM with privacy.mode=dp-sgd"))
        if _changed(p, "max_grad_norm") and p.mode == "dp-release":
            out.append(("privacy.max_grad_norm", "dp-release clips nothing: every record's feature row has norm 1 "
                                                 "(sensitivity 1 by construction)"))
    for name in ("pga", "merf"):
        if cfg.algorithm != name:
            out += [(f"{name}.{key}", f"used only by algorithm={name}") for key in _changed(getattr(cfg, name))]
    if cfg.trains_generator:
        for section, names in _FEDDM_ONLY.items():
            out += [(f"{section}.{name}", f"used only by algorithm=feddm ({cfg.algorithm} trains a GAN generator: "
                                          f"see the {cfg.algorithm} section)")
                    for name in _changed(getattr(cfg, section), *names)]
    if cfg.train.lr_decay_rounds is None and _changed(cfg.train, "lr_final_ratio"):
        out.append(("train.lr_final_ratio", "the end of a decay: set train.lr_decay_rounds"))
    for name, strategies in _STRATEGY_KEYS.items():
        if cfg.fl.strategy not in strategies and _changed(cfg.fl, name):
            out.append((f"fl.{name}", f"used only with fl.strategy={' or '.join(strategies)}"))
    if cfg.data.dataset == "digits" and cfg.data.path is not None:
        out.append(("data.path", "data.dataset=digits is bundled with scikit-learn and reads no files (remove "
                                 "data.path, or choose the dataset the files hold)"))
    return out


# Keys whose change on an existing run directory does not alter what the run computes.
RESUMABLE_CHANGES = ("fl.rounds", "train.device", "log.sample_every", "log.keep_checkpoints", "log.loss_eval_samples",
                     "log.tensorboard",
                     "log.samples_per_class", "description",
                     "eval.every", "eval.samples", "eval.sampler", "eval.steps", "eval.bf16",
                     "eval.tstr", "eval.tstr_samples",
                     "eval.inception_weights", "diffusion.sigma", "diffusion.guidance", "train.cpu_threads",
                     "fl.min_clients", "fl.max_update_norm_ratio", "runtime.round_timeout_s",
                     "runtime.message_ttl_s", "runtime.wait_for_nodes_s", "runtime.link_timeout_s",
                     "runtime.sim_cpus_per_client", "runtime.sim_cpus")


