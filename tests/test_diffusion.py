"""The diffusion process: schedules, q_sample, the posterior, conversions, samplers, CFG and the loss."""
import math

import numpy as np
import pytest
import torch

from diffusion import (DiffusionConfig, GaussianDiffusion, cosine_betas, dynamic_threshold, guided,
                       linear_betas, space_timesteps)
from dit import DiT, DiTConfig


def test_linear_schedule_closed_form():
    b = linear_betas(1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999)
    d = GaussianDiffusion(DiffusionConfig(prediction="eps"))
    assert d.alphas_cumprod.dtype == torch.float64
    t = 500
    assert d.alphas_cumprod[t].item() == pytest.approx(np.prod(1 - b[:t + 1]), rel=1e-12)


def test_cosine_schedule_closed_form():
    d = GaussianDiffusion(DiffusionConfig(schedule="cosine"))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 400, 900):      # alpha_bar_t = f(t+1) / f(0) while no beta is clipped
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine_betas(1000).max() <= 0.999


def test_q_sample_statistics():
    d = GaussianDiffusion(DiffusionConfig(prediction="eps"))
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 2, 2), 0.7)
    for t in (0, 300, 999):
        tt = torch.full((20000,), t)
        xt = d.q_sample(x0, tt, torch.randn_like(x0))
        a = d.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - a, rel=0.03, abs=1e-5)


def test_posterior_matches_brute_force_bayes():
    d = GaussianDiffusion(DiffusionConfig(prediction="eps"))
    x0, xt = 0.3, -0.4
    for t in (1, 50, 700):
        b, a_prev = d.betas[t].item(), d.alphas_cumprod_prev[t].item()
        # p(x_{t-1} | x_t, x0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x0): integrate on a grid.
        grid = np.linspace(-6, 6, 400001)
        logp = (-(xt - math.sqrt(1 - b) * grid) ** 2 / (2 * b)
                - (grid - math.sqrt(a_prev) * x0) ** 2 / (2 * (1 - a_prev)))
        w = np.exp(logp - logp.max())
        w /= w.sum()
        mean = (w * grid).sum()
        var = (w * (grid - mean) ** 2).sum()
        m, v, logv = d.q_posterior(torch.tensor([[x0]]), torch.tensor([[xt]]), torch.tensor([t]))
        assert m.item() == pytest.approx(mean, abs=1e-5)
        assert v.item() == pytest.approx(var, rel=1e-3)
        assert logv.item() == pytest.approx(math.log(var), abs=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_conversions_recover_x0(prediction):
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    torch.manual_seed(1)
    x0, noise = torch.rand(5, 1, 4, 4) * 2 - 1, torch.randn(5, 1, 4, 4)
    t = torch.tensor([0, 10, 250, 600, 999])
    xt = d.q_sample(x0, t, noise)
    out = {"eps": noise, "x0": x0, "v": d.v_target(x0, t, noise)}[prediction]
    x0_hat, _ = d.split_output(out, xt, t)
    assert torch.allclose(x0_hat, x0, atol=2e-3 if prediction == "eps" else 1e-5)
    assert torch.allclose(d.x0_to_eps(xt, t, x0)[1:], noise[1:], atol=1e-3)


def true_eps_model(d, x0):
    """A 'network' that knows the clean image: returns the exact eps of x_t."""
    return lambda x, t, y: d.x0_to_eps(x, t, x0.expand_as(x))


def test_ddim_eta0_is_deterministic_and_recovers_x0():
    d = GaussianDiffusion(DiffusionConfig(prediction="eps"))
    x0 = torch.rand(1, 1, 4, 4).mul(1.8).sub(0.9).expand(3, 1, 4, 4)
    y = torch.zeros(3, dtype=torch.long)
    runs = [d.sample(true_eps_model(d, x0), (3, 1, 4, 4), y, sampler="ddim", steps=20,
                     generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert torch.allclose(runs[0], x0, atol=1e-4) and torch.allclose(runs[2], x0, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m"])
def test_other_samplers_recover_x0_with_a_perfect_model(sampler):
    d = GaussianDiffusion(DiffusionConfig(prediction="eps"))
    x0 = torch.rand(2, 1, 4, 4) * 1.8 - 0.9
    out = d.sample(true_eps_model(d, x0), (2, 1, 4, 4), torch.zeros(2, dtype=torch.long), sampler=sampler,
                   steps=25, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-4)


def test_respaced_ddpm_with_all_steps_equals_plain_ddpm():
    d = GaussianDiffusion(DiffusionConfig(prediction="eps"))
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert np.allclose(d.respace(list(range(1000))).betas.numpy(), d.betas.numpy(), rtol=1e-9, atol=0)
    model = lambda x, t, y: 0.3 * x + 0.001 * t.float().view(-1, 1, 1, 1)   # any smooth "network"
    shape, y = (2, 1, 3, 3), torch.zeros(2, dtype=torch.long)
    respaced = d.sample(model, shape, y, sampler="ddpm", steps=1000, generator=torch.Generator().manual_seed(0))
    # Plain DDPM (Algorithm 2) written out on the original process with the same noise stream.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    for i in reversed(range(1000)):
        t = torch.full((2,), i)
        x0 = d.eps_to_x0(x, t, model(x, t, y)).clamp(-1, 1)
        mean, _, logvar = d.q_posterior(x0, x, t)
        x = mean + (torch.exp(0.5 * logvar) * torch.randn(shape, generator=g) if i > 0 else 0)
    assert torch.allclose(respaced, x, atol=1e-5)


def test_space_timesteps():
    assert space_timesteps(1000, 5) == [0, 250, 500, 749, 999]
    assert space_timesteps(1000, 1) == [999]                              # one step: the noisiest timestep
    with pytest.raises(ValueError):
        space_timesteps(1000, 0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_one_step_is_one_call_at_the_last_timestep_and_returns_its_x0(sampler):
    d, seen = GaussianDiffusion(DiffusionConfig(prediction="x0")), []
    x0 = torch.rand(2, 1, 4, 4) * 1.8 - 0.9

    def model(x, t, y):
        seen.append(t.tolist())
        return x0
    out = d.sample(model, (2, 1, 4, 4), torch.zeros(2, dtype=torch.long), sampler=sampler, steps=1,
                   generator=torch.Generator().manual_seed(0))
    assert seen == [[999, 999]] and torch.allclose(out, x0, atol=1e-6)


@pytest.mark.parametrize("num_timesteps", [1, 2, 10])
def test_very_short_processes_are_valid(num_timesteps):
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=num_timesteps, prediction="eps"))
    assert (d.betas > 0).all() and (d.betas < 1).all() and torch.isfinite(d.posterior_log_variance_clipped).all()
    model = lambda x, t, y: torch.cat([torch.tanh(x), torch.zeros_like(x)], 1)    # learned variance too
    out = d.sample(model, (2, 1, 4, 4), torch.zeros(2, dtype=torch.long), sampler="ddpm", steps=num_timesteps,
                   generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    terms = d.training_loss(model, torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(terms["loss"]) and "vlb" in terms


def test_variance_channels_are_read_off_the_output():
    d, x = GaussianDiffusion(DiffusionConfig(prediction="x0")), torch.zeros(2, 3, 4, 4)
    t = torch.tensor([3, 4])
    assert d.split_output(torch.ones(2, 3, 4, 4), x, t)[1] is None
    assert d.split_output(torch.ones(2, 6, 4, 4), x, t)[1].shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="returned 4 channels for 3-channel images"):
        d.split_output(torch.ones(2, 4, 4, 4), x, t)


def test_cfg_is_one_doubled_batch_and_guides_every_channel():
    model = DiT(DiTConfig(image_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, learn_sigma=True)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 600]), torch.tensor([1, 2])
    assert guided(model, 1.0, 10) is model
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    calls = []
    counted = lambda *a: calls.append(len(a[0])) or model(*a)
    assert torch.allclose(guided(counted, 3.0, 10)(x, t, y), uncond + 3.0 * (cond - uncond), atol=1e-4)
    assert calls == [4]                                                  # one call, conditional and null batch
    assert torch.allclose(guided(model, 0.0, 10)(x, t, y), uncond, atol=1e-5)
    assert not torch.allclose(cond[:, 1:], uncond[:, 1:])                # the variance channel is guided too


def test_sampling_is_bit_identical_for_a_seed():
    d = GaussianDiffusion(DiffusionConfig(prediction="eps"))
    model = lambda x, t, y: torch.cat([torch.tanh(x), torch.zeros_like(x)], 1)
    run = lambda: d.sample(model, (2, 1, 4, 4), torch.tensor([1, 2]), sampler="ddpm", steps=30,
                           cfg_scale=2.0, null_class=10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(run(), run())


def test_dynamic_threshold():
    x0 = torch.tensor([[[[0.5, -3.0] + [0.2] * 98]]])      # 1% of pixels far out
    out = dynamic_threshold(x0, percentile=0.99, max_threshold=1.7)
    assert out.abs().max() <= 1.0
    inside = dynamic_threshold(torch.full((1, 1, 2, 2), 0.5))
    assert torch.equal(inside, torch.full((1, 1, 2, 2), 0.5))  # s clamps to 1: no change inside [-1, 1]


def test_hybrid_loss_with_learned_sigma():
    d = GaussianDiffusion(DiffusionConfig(prediction="eps"))
    model = DiT(DiTConfig(image_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, learn_sigma=True))
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    terms = d.training_loss(model, x0, torch.tensor([0, 1, 2, 3]), t=torch.tensor([0, 1, 500, 999]))
    assert set(terms) == {"mse", "vlb", "loss"} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("prediction,factor", [("x0", 10), ("v", 10), ("eps", 5)])
def test_tiny_model_overfits_a_handful_of_images(prediction, factor):
    """Training on 4 images with random t and noise: the loss on a fixed evaluation set of (t, noise)
    falls 10x within 300 steps for x0/v (measured ~2000x / ~17x); eps falls slower (~9x), because
    at small t the noise must be read off nearly clean pixels."""
    torch.manual_seed(0)
    cfg = DiTConfig(image_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, class_dropout_prob=0.0)
    model = DiT(cfg)
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    x0 = (torch.rand(4, 1, 8, 8) > 0.5).float() * 2 - 1
    y = torch.arange(4)
    eval_set = dict(x0=x0.repeat(64, 1, 1, 1), y=y.repeat(64), t=torch.randint(0, 1000, (256,)),
                    noise=torch.randn(256, 1, 8, 8))
    first = d.training_loss(model, **eval_set)["loss"].item()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(300):
        loss = d.training_loss(model, x0.repeat(8, 1, 1, 1), y.repeat(8))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = d.training_loss(model, **eval_set)["loss"].item()
    assert last < first / factor


def test_logit_normal_timesteps_favour_the_middle_and_stay_in_range():
    g = torch.Generator().manual_seed(0)
    uniform = GaussianDiffusion(DiffusionConfig(prediction="eps")).draw_timesteps(20000, g)
    middle = GaussianDiffusion(DiffusionConfig(timestep_sampling="logit-normal")).draw_timesteps(20000, g)
    for t in (uniform, middle):
        assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    share = lambda t: ((t >= 250) & (t < 750)).float().mean().item()     # the middle half of the process
    assert share(uniform) == pytest.approx(0.5, abs=0.02) and share(middle) == pytest.approx(0.74, abs=0.02)
    with pytest.raises(ValueError, match="unknown timestep sampling 'beta'"):
        GaussianDiffusion(DiffusionConfig(timestep_sampling="beta"))


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_loss_weights_are_defined_on_the_x0_error_whatever_is_predicted(prediction):
    """The same weighting gives the same loss whether the network predicts x0, eps or v: the weights are set on
    the x0 error and converted (eps error = SNR x0 error, v error = (1 + SNR) x0 error)."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1, torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([20, 50, 200, 500, 800, 999])     # not t = 0: converting x0 to eps there loses float32 digits
    x0_hat = x0 + 0.1 * torch.randn(6, 1, 4, 4, generator=g)       # the same wrong x0, expressed three ways
    for weight, gamma in (("min-snr", 5.0), ("v-clipped", 5.0), ("v-clipped", 2.0)):
        d = GaussianDiffusion(DiffusionConfig(prediction=prediction, loss_weight=weight, snr_gamma=gamma))
        xt = d.q_sample(x0, t, noise)
        out = {"x0": x0_hat, "eps": d.x0_to_eps(xt, t, x0_hat),
               "v": d.v_target(x0_hat, t, d.x0_to_eps(xt, t, x0_hat))}[prediction]
        loss = d.training_loss(lambda *a: out, x0, None, t=t, noise=noise)["loss"]
        acp = d.alphas_cumprod[t].float()
        snr = acp / (1 - acp)
        w = (snr if weight == "min-snr" else 1 + snr).clamp(max=gamma)
        expected = (w * (x0_hat - x0).square().flatten(1).mean(1)).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-3), (weight, prediction)
    with pytest.raises(ValueError, match="unknown loss weight"):
        GaussianDiffusion(DiffusionConfig(loss_weight="edm"))


def _jumpy_x0(x, t, y):
    """An x0-predictor whose answer moves with t (as a real network's does between steps): the samplers' last
    steps then lean on their eps coefficients, where 1 - alpha_bar is ~1e-5."""
    pattern = torch.arange(x[0].numel(), dtype=x.dtype).view(x.shape[1:])
    return 0.7 * torch.cos(pattern + 0.5 * t.view(-1, 1, 1, 1).to(x.dtype)) + 0.2 * torch.tanh(x)


def _float64_run(process, timesteps, sampler, noise, first_order_last=False):
    """The same sampler written out in float64 from the respaced alpha_bar, as the textbook has it
    (first_order_last: DPM-Solver++'s step onto the last timestep takes D = x0, as DDIM's)."""
    alpha_bar = process.alphas_cumprod.numpy()
    lam = lambda a: 0.5 * np.log(a / (1 - a))                          # noqa: E731
    x, prev_x0, h_before = noise.double(), None, None
    for i in reversed(range(len(timesteps))):
        x0 = _jumpy_x0(x, torch.full((x.shape[0],), timesteps[i], dtype=torch.float64), None).clamp(-1, 1)
        a, a_prev = alpha_bar[i], (alpha_bar[i - 1] if i > 0 else 1.0)
        if sampler == "ddim":
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        elif i == 0:
            x = x0
        else:
            h = lam(a_prev) - lam(a)
            first = prev_x0 is None or (first_order_last and i == 1)
            D = x0 if first else (1 + h / (2 * h_before)) * x0 - h / (2 * h_before) * prev_x0
            x = math.sqrt((1 - a_prev) / (1 - a)) * x - math.sqrt(a_prev) * math.expm1(-h) * D
            prev_x0, h_before = x0, h
    return x


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 1000), ("dpm++2m", 1000), ("dpm++2m", 10), ("ddim", 50)])
def test_sampler_coefficients_keep_float64_precision_near_t0(schedule, sampler, steps):
    """The float32 samplers within 1e-6 of a float64 run: on the cosine schedule 1 - alpha_bar_0 is 4.1e-5,
    which float32 alpha_bar holds to 3 digits only, so the coefficients are formed from float64 tables."""
    d = GaussianDiffusion(DiffusionConfig(schedule=schedule, prediction="x0"))
    timesteps = space_timesteps(d.num_timesteps, steps)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = d.sample(_jumpy_x0, noise.shape, torch.zeros(4, dtype=torch.long), sampler=sampler, steps=steps,
                   noise=noise)
    reference = _float64_run(d.respace(timesteps), timesteps, sampler, noise)
    assert out.dtype == torch.float32
    assert (out.double() - reference).abs().max().item() <= 1e-6


@pytest.mark.parametrize("steps", [5, 10, 14, 15, 20])
def test_lower_order_final_is_a_first_order_last_step_below_15_steps(steps):
    """diffusers' lower_order_final: below 15 steps DPM-Solver++(2M)'s step onto the last timestep is first
    order (D = x0), matching the float64 sampler written that way; from 15 steps on it changes nothing."""
    d = GaussianDiffusion(DiffusionConfig(prediction="x0"))
    timesteps = space_timesteps(d.num_timesteps, steps)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    run = lambda lof: d.sample(_jumpy_x0, noise.shape, torch.zeros(4, dtype=torch.long), sampler="dpm++2m",
                               steps=steps, noise=noise, lower_order_final=lof)           # noqa: E731
    out, second_order = run(True), run(False)
    if steps < 15:
        reference = _float64_run(d.respace(timesteps), timesteps, "dpm++2m", noise, first_order_last=True)
        assert (out.double() - reference).abs().max().item() <= 1e-6
        assert (out - second_order).abs().max().item() > 1e-3
    else:
        assert torch.equal(out, second_order)
