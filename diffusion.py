"""
The diffusion process: noise schedules, the forward process q(x_t | x_0), the training loss, and
the samplers (DDPM, respaced DDPM, DDIM, DPM-Solver++ 2M).

This file knows no network. Everything that needs one takes a callable

    model_fn(x, t, y) -> out        x (N, C, H, W) float32, t (N,) int64, y (N,) int64

which may be a DiT, an ONNX Runtime session or a TensorRT engine wrapped in a function, so the
sampling math exists exactly once. `out` is the network's prediction of eps, x0 or v (the
`prediction` setting), followed by C variance channels when the variance is learned: an output
with 2C channels is what says so (the network's config is the one place that decides it).

Papers and the equations used below:
  DDPM   Ho et al. 2020, arXiv 2006.11239            forward process, posterior, ancestral sampler
  IDDPM  Nichol & Dhariwal 2021, arXiv 2102.09672   cosine schedule, learned variance, hybrid loss, respacing
  DDIM   Song et al. 2021, arXiv 2010.02502          deterministic (eta = 0) sampler
  v      Salimans & Ho 2022, arXiv 2202.00512        v-prediction
  CFG    Ho & Salimans 2022, arXiv 2207.12598        classifier-free guidance
  DPM++  Lu et al. 2022, arXiv 2211.01095            DPM-Solver++(2M)
  Imagen Saharia et al. 2022, arXiv 2205.11487       dynamic thresholding
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PREDICTIONS = ("eps", "x0", "v")                      # what the network outputs
SCHEDULES = ("linear", "cosine")                      # noise schedules: DDPM's, IDDPM's
TIMESTEP_SAMPLINGS = ("uniform", "logit-normal")      # how training draws t
LOSS_WEIGHTS = ("none", "min-snr", "v-clipped")       # weightings of the loss over t
SAMPLERS = ("ddpm", "ddim", "dpm++2m")                # the sampling loops of sample()


@dataclass
class DiffusionConfig:
    """The diffusion process a model was trained with; stored in checkpoints beside the DiTConfig."""
    num_timesteps: int = 1000
    schedule: str = "linear"      # "linear" (DDPM: 1e-4 -> 0.02, the lesson's) or "cosine" (IDDPM)
    prediction: str = "x0"        # what the network outputs: "eps", "x0" or "v" (train.py's default)
    vlb_weight: float = 1e-3      # lambda of IDDPM's L_hybrid = L_simple + lambda * L_vlb
    timestep_sampling: str = "uniform"   # how training draws t: "uniform" (DDPM) or "logit-normal"
    loss_weight: str = "none"     # weighting of the MSE over t: "none", "min-snr" or "v-clipped"
    snr_gamma: float = 5.0        # the clip of those weightings


# ----------------------------------------------------------------------------------------------
#                                        Noise schedules
# ----------------------------------------------------------------------------------------------

def linear_betas(num_timesteps, beta_start=1e-4, beta_end=0.02, max_beta=0.999):
    """DDPM Sec. 4: betas linear from 1e-4 to 0.02 for T = 1000, scaled so other T keep the same curve
    (clipped at 0.999 as the cosine schedule is: the scaled end passes 1 below T = 20)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps,
                       dtype=np.float64).clip(max=max_beta)


def cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    """IDDPM Eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), betas clipped at 0.999."""
    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def space_timesteps(num_timesteps, steps):
    """`steps` timesteps spread evenly over [0, T-1], both ends included (IDDPM Sec. 4 respacing);
    one step is one network call at the noisiest timestep T-1, whose x0 is the sample."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    return sorted(set(np.linspace(0, num_timesteps - 1, steps).round().astype(int).tolist()))


def dynamic_threshold(x0, percentile=0.99, max_threshold=1.7):
    """Imagen Sec. 2.3, as in the lesson: s = the p-quantile of |x0| per image, clamped to [1, c];
    clip x0 to [-s, s] and divide by s, pulling saturated pixels back into [-1, 1]."""
    s = torch.quantile(x0.abs().flatten(1), percentile, dim=1).clamp(1.0, max_threshold)
    s = s.view(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-s, s) / s


# ----------------------------------------------------------------------------------------------
#                                    Classifier-free guidance
# ----------------------------------------------------------------------------------------------

def guided(model_fn, cfg_scale, null_class):
    """Wrap model_fn with CFG (Ho & Salimans Eq. 6): out = out_u + w (out_c - out_u), on all channels.

    Conditional and null-class inputs run as one doubled batch, so an engine's batch profile must
    cover 2x the sampling batch. Guiding eps, x0 or v is the same thing: each is an affine function
    of the others at fixed x_t.
    """
    if cfg_scale == 1.0:
        return model_fn

    def guided_fn(x, t, y):
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)
    return guided_fn


# ----------------------------------------------------------------------------------------------
#                                    The Gaussian diffusion
# ----------------------------------------------------------------------------------------------

def learns_sigma(out, x):
    """Whether a network output carries variance channels: 2C of them for C-channel images."""
    if out.shape[1] not in (x.shape[1], 2 * x.shape[1]):
        raise ValueError(f"the network returned {out.shape[1]} channels for {x.shape[1]}-channel images; "
                         f"expected {x.shape[1]} or {2 * x.shape[1]}")
    return out.shape[1] == 2 * x.shape[1]


def _table(values):
    """A float64 tensor of a schedule's values (one per timestep)."""
    return torch.from_numpy(np.asarray(values, dtype=np.float64))


def _gather64(table, t, x):
    """table[t] as a float64 column broadcastable against x: (N,) -> (N, 1, 1, 1)."""
    return table.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))


def _gather(table, t, x):
    """table[t] as a float32 column broadcastable against x: (N,) -> (N, 1, 1, 1)."""
    return _gather64(table, t, x).float()


class GaussianDiffusion:
    """The DDPM forward process, its posterior, the training loss and the samplers for one schedule."""

    def __init__(self, config: DiffusionConfig, betas=None):
        if config.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {config.prediction!r}; expected one of {PREDICTIONS}")
        if config.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {config.timestep_sampling!r}; expected one of "
                             f"{TIMESTEP_SAMPLINGS}")
        if config.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss weight {config.loss_weight!r}; expected one of {LOSS_WEIGHTS}")
        self.config = config
        if betas is None:
            if config.schedule == "linear":
                betas = linear_betas(config.num_timesteps)
            elif config.schedule == "cosine":
                betas = cosine_betas(config.num_timesteps)
            else:
                raise ValueError(f"unknown schedule {config.schedule!r}; expected one of {SCHEDULES}")
        # Every table is computed once in float64 (1 - alpha_bar near t = 0 is ~1e-5: float32
        # would lose digits) and kept as a tensor; _gather casts the picked rows to float32. The samplers
        # combine rows in float64 (_gather64) and cast only the finished coefficient.
        b = np.asarray(betas, dtype=np.float64)
        alpha_bar = np.cumprod(1.0 - b)                                     # alpha_bar_t
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])                     # alpha_bar_{t-1}
        posterior_var = b * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)      # DDPM Eq. 7, beta~_t
        self.num_timesteps = len(b)
        self.betas = _table(b)
        self.alphas_cumprod = _table(alpha_bar)
        self.alphas_cumprod_prev = _table(alpha_bar_prev)
        self.sqrt_alphas_cumprod = _table(np.sqrt(alpha_bar))
        self.sqrt_one_minus_alphas_cumprod = _table(np.sqrt(1.0 - alpha_bar))
        self.sqrt_alphas_cumprod_prev = _table(np.sqrt(alpha_bar_prev))
        self.sqrt_one_minus_alphas_cumprod_prev = _table(np.sqrt(1.0 - alpha_bar_prev))
        # lambda = log(alpha / sigma), half the log-SNR: DPM-Solver's time variable (+inf at alpha_bar = 1).
        with np.errstate(divide="ignore"):
            self.lambdas = _table(0.5 * (np.log(alpha_bar) - np.log1p(-alpha_bar)))
            self.lambdas_prev = _table(0.5 * (np.log(alpha_bar_prev) - np.log1p(-alpha_bar_prev)))
        self.posterior_variance = _table(posterior_var)
        # beta~_0 = 0: clip the log at t = 0 to beta~_1 (IDDPM's convention). A one-step process has no
        # beta~_1; its one step is the last, which adds no noise, so beta_0 stands in.
        first = posterior_var[1] if len(b) > 1 else b[0]
        self.posterior_log_variance_clipped = _table(np.log(np.append(first, posterior_var[1:])))
        # DDPM Eq. 7: the posterior mean's coefficients on x0 and on x_t
        self.posterior_mean_coef1 = _table(b * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar))
        self.posterior_mean_coef2 = _table((1.0 - alpha_bar_prev) * np.sqrt(1.0 - b) / (1.0 - alpha_bar))
        # Which timestep of the trained model each step of this (possibly respaced) process is.
        self.timestep_map = torch.arange(self.num_timesteps)

    # ---------------------------------------------------------------- forward process and posterior

    def q_sample(self, x0, t, noise):
        """DDPM Eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        return (_gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x0, xt, t):
        """DDPM Eqs. 6-7: q(x_{t-1} | x_t, x0) = N(mu~_t, beta~_t I); returns (mean, variance,
        log variance)."""
        mean = _gather(self.posterior_mean_coef1, t, xt) * x0 + _gather(self.posterior_mean_coef2, t, xt) * xt
        return (mean, _gather(self.posterior_variance, t, xt),
                _gather(self.posterior_log_variance_clipped, t, xt))

    def eps_to_x0(self, xt, t, eps):
        """Invert Eq. 4 for x0: x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
        return ((xt - _gather(self.sqrt_one_minus_alphas_cumprod, t, xt) * eps)
                / _gather(self.sqrt_alphas_cumprod, t, xt))

    def x0_to_eps(self, xt, t, x0):
        """Invert Eq. 4 for eps: eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)."""
        return ((xt - _gather(self.sqrt_alphas_cumprod, t, xt) * x0)
                / _gather(self.sqrt_one_minus_alphas_cumprod, t, xt))

    def v_target(self, x0, t, noise):
        """Salimans & Ho Sec. 4: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0."""
        return (_gather(self.sqrt_alphas_cumprod, t, x0) * noise
                - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    def v_to_x0(self, xt, t, v):
        """x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v (the rotation that defines v, inverted)."""
        return (_gather(self.sqrt_alphas_cumprod, t, xt) * xt
                - _gather(self.sqrt_one_minus_alphas_cumprod, t, xt) * v)

    def split_output(self, out, xt, t):
        """Network output -> (x0, variance channels or None), whatever the network predicts."""
        C = xt.shape[1]
        pred, var_values = (out[:, :C], out[:, C:]) if learns_sigma(out, xt) else (out, None)
        if self.config.prediction == "eps":
            x0 = self.eps_to_x0(xt, t, pred)
        elif self.config.prediction == "x0":
            x0 = pred
        else:
            x0 = self.v_to_x0(xt, t, pred)
        return x0, var_values

    def model_log_variance(self, var_values, t, x):
        """IDDPM Eq. 15: log Sigma = v log beta_t + (1 - v) log beta~_t, with the output v in
        [-1, 1] -> [0, 1]."""
        if var_values is None:          # fixed variance: beta~_t (DDPM's sigma_t^2 = beta~_t choice)
            return _gather(self.posterior_log_variance_clipped, t, x)
        frac = (var_values + 1) / 2
        return (frac * _gather(torch.log(self.betas), t, x)
                + (1 - frac) * _gather(self.posterior_log_variance_clipped, t, x))

    # ---------------------------------------------------------------- training loss

    def draw_timesteps(self, n, generator=None, device="cpu"):
        """Training timesteps: uniform over [0, T) (DDPM), or logit-normal (Esser et al. 2024, Sec. 3.1):
        t/T = sigmoid(u), u ~ N(0, 1), which spends more of training in the middle of the process."""
        if self.config.timestep_sampling == "uniform":
            return torch.randint(self.num_timesteps, (n,), generator=generator, device=device)
        u = torch.randn(n, generator=generator, device=device)
        return (torch.sigmoid(u) * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)

    def training_loss(self, model_fn, x0, y, t=None, noise=None):
        """L_simple (DDPM Eq. 14): MSE between the network's output and its target (eps, x0 or v) at a
        drawn t; plus, with learned sigma, lambda * L_vlb (IDDPM Sec. 3.1, the hybrid loss).
        Returns a dict of per-batch scalar losses, "loss" being the one to minimise."""
        if t is None:
            t = self.draw_timesteps(x0.shape[0], device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, t, y)
        C = x0.shape[1]
        pred = out[:, :C]
        target = {"eps": noise, "x0": x0, "v": self.v_target(x0, t, noise)}[self.config.prediction]
        if self.config.loss_weight == "none":
            terms = {"mse": F.mse_loss(pred.float(), target)}
        else:
            error = (pred.float() - target).square().flatten(1).mean(1)           # (N,) per image
            terms = {"mse": (self.loss_weight(t, x0) * error).mean()}
        terms["loss"] = terms["mse"]
        if learns_sigma(out, x0):
            # The vlb term trains only the variance: the mean is frozen (detached), as in IDDPM, so
            # L_vlb does not disturb the mean that L_simple learns. L_vlb sums T per-step KL terms:
            # weighting one sampled step by lambda * T is an unbiased estimate of lambda * L_vlb.
            frozen = torch.cat([pred.detach(), out[:, C:]], dim=1).float()
            terms["vlb"] = self.vlb_term(frozen, x0, xt, t).mean()
            terms["loss"] = terms["loss"] + self.config.vlb_weight * self.num_timesteps * terms["vlb"]
        return terms

    def loss_weight(self, t, x):
        """Per-step weights of the prediction's MSE, defined on the x0 error and converted to the predicted
        quantity (its error is the x0 error times SNR for eps, times 1 + SNR for v;
        SNR = alpha_bar / (1 - alpha_bar)):
          min-snr    min(SNR, gamma): Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556);
          v-clipped  min(1 + SNR, gamma): the v-loss's weighting, clipped the same way."""
        alpha_bar = _gather(self.alphas_cumprod, t, x).flatten()
        snr, gamma = alpha_bar / (1 - alpha_bar), self.config.snr_gamma
        x0_weight = (snr if self.config.loss_weight == "min-snr" else 1 + snr).clamp(max=gamma)
        return x0_weight / {"x0": torch.ones_like(snr), "eps": snr, "v": 1 + snr}[self.config.prediction]

    def vlb_term(self, out, x0, xt, t):
        """One step of the variational bound in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0,
        the discretised decoder NLL -log p(x0|x1) at t = 0 (DDPM Eq. 5 and Sec. 3.3)."""
        true_mean, _, true_logvar = self.q_posterior(x0, xt, t)
        x0_pred, var_values = self.split_output(out, xt, t)
        model_mean, _, _ = self.q_posterior(x0_pred, xt, t)
        model_logvar = self.model_log_variance(var_values, t, xt)
        kl = 0.5 * (-1.0 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = (-discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1)
               / math.log(2.0))
        return torch.where(t == 0, nll, kl)                                   # (N,)

    # ---------------------------------------------------------------- respacing

    def respace(self, timesteps):
        """A process over a subset of the trained timesteps with the same alpha_bar at each (IDDPM Sec. 4):
        beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}. Step i calls the network with t = timesteps[i]."""
        alpha_bar = self.alphas_cumprod.numpy()
        last, betas = 1.0, []
        for t in timesteps:
            betas.append(1.0 - alpha_bar[t] / last)
            last = alpha_bar[t]
        spaced = GaussianDiffusion(self.config, betas=np.array(betas))
        spaced.timestep_map = self.timestep_map[torch.as_tensor(timesteps)]
        return spaced

    # ---------------------------------------------------------------- samplers

    def sample(self, model_fn, shape, y, *, sampler="ddim", steps=50, cfg_scale=1.0, null_class=None,
               eta=0.0, thresholding=False, noise=None, generator=None, device="cpu",
               lower_order_final=False):
        """Draw images for labels y with one of SAMPLERS over `steps` evenly spaced timesteps.

        All samplers share this loop: call the (guided) network, turn its output into x0, then take
        the sampler's step from x_t to x_{t_prev}. Noise comes from `generator` on the CPU and is
        moved to `device`, so a seed gives the same images on every backend (bit-identical on CPU).
        lower_order_final: DPM-Solver++(2M)'s step onto the last timestep is first order (as DDIM's) when
        there are fewer than 15 steps, as diffusers' DPMSolverMultistepScheduler does, which it finds
        steadier at few steps. Returns float32 images in [-1, 1] (N, C, H, W) on `device`.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        if cfg_scale != 1.0 and null_class is None:
            raise ValueError("classifier-free guidance needs null_class (the model's num_classes)")
        process = self.respace(space_timesteps(self.num_timesteps, steps))
        fn = guided(model_fn, cfg_scale, null_class)
        y = y.to(device)
        randn = lambda: torch.randn(shape, generator=generator).to(device)
        x = noise.to(device) if noise is not None else randn()
        prev_x0 = None                                                   # DPM-Solver++ 2M's history
        for i in reversed(range(process.num_timesteps)):
            i_t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            out = fn(x, process.timestep_map.to(device)[i_t], y).float()
            x0, var_values = process.split_output(out, x, i_t)
            x0 = dynamic_threshold(x0) if thresholding else x0.clamp(-1, 1)     # the data lives in [-1, 1]
            if sampler == "ddpm":
                x = process.ddpm_step(x, x0, var_values, i_t, None if i == 0 else randn())
            elif sampler == "ddim":
                x = process.ddim_step(x, x0, i_t, eta, None if (i == 0 or eta == 0) else randn())
            else:
                first_order = lower_order_final and i == 1 and process.num_timesteps < 15
                x = process.dpmpp_2m_step(x, x0, None if first_order else prev_x0, i_t)
                prev_x0 = x0
        return x

    def ddpm_step(self, xt, x0, var_values, t, noise):
        """DDPM Algorithm 2 through the posterior: x_{t-1} = mu~_t(x_t, x0) + sigma_t z, no noise at
        the last step."""
        mean, _, _ = self.q_posterior(x0, xt, t)
        if noise is None:
            return mean
        return mean + torch.exp(0.5 * self.model_log_variance(var_values, t, xt)) * noise

    def ddim_step(self, xt, x0, t, eta, noise):
        """DDIM Eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - a_prev)/(1 - a)) sqrt(1 - a/a_prev) (Eq. 16); eta = 0 is deterministic."""
        eps = self.x0_to_eps(xt, t, x0)
        a, a_prev = _gather64(self.alphas_cumprod, t, xt), _gather64(self.alphas_cumprod_prev, t, xt)
        sqrt_one_minus_prev = _gather64(self.sqrt_one_minus_alphas_cumprod_prev, t, xt)
        sigma = eta * sqrt_one_minus_prev / torch.sqrt(1 - a) * torch.sqrt(1 - a / a_prev)
        eps_coef = torch.sqrt(sqrt_one_minus_prev ** 2 - sigma ** 2)
        x_prev = _gather(self.sqrt_alphas_cumprod_prev, t, xt) * x0 + eps_coef.float() * eps
        return x_prev if noise is None else x_prev + sigma.float() * noise

    def dpmpp_2m_step(self, xt, x0, prev_x0, t):
        """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in the data-prediction form. With
        lambda = log(alpha / sigma) and h = lambda_prev - lambda_t:
            x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D,
        D = x0 on the first step (= DDIM), else the 2nd-order extrapolation
            D = (1 + 1/(2r)) x0 - 1/(2r) x0_before, r = h_before / h.
        The last step lands on alpha_bar = 1 (sigma = 0), where x_prev = x0."""
        if int(t[0]) == 0:
            return x0
        lam_t = _gather64(self.lambdas, t, xt)
        h = _gather64(self.lambdas_prev, t, xt) - lam_t
        D = x0
        if prev_x0 is not None:
            lam_before = _gather64(self.lambdas, t + 1, xt)               # the step taken before this one
            half_over_r = (h / (2 * (lam_t - lam_before))).float()       # 1 / (2r)
            D = (1 + half_over_r) * x0 - half_over_r * prev_x0
        sigma_ratio = (_gather64(self.sqrt_one_minus_alphas_cumprod_prev, t, xt)
                       / _gather64(self.sqrt_one_minus_alphas_cumprod, t, xt))
        d_coef = -_gather64(self.sqrt_alphas_cumprod_prev, t, xt) * torch.expm1(-h)
        return sigma_ratio.float() * xt + d_coef.float() * D


# ----------------------------------------------------------------------------------------------
#                                  Decoder likelihood (for L_vlb)
# ----------------------------------------------------------------------------------------------

def _approx_standard_normal_cdf(x):
    """A fast tanh approximation of the standard normal CDF (as in DDPM's and IDDPM's code)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) for 8-bit data scaled to [-1, 1] under N(means, e^{2 log_scales}) integrated over each
    pixel's bin of width 2/255, open-ended at -1 and 1 (DDPM Eq. 13)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min,
                                        torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs
