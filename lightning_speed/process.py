"""The diffusion process: forward noising, prediction targets and THE training loss.

``GaussianDiffusion`` holds a schedule's tables as float32 buffers on the model's device and
does everything per step with gathers and broadcasting: no host syncs. ``training_losses`` is
the one place the loss is computed (the module's training and validation steps both call it).
Image generation (DDIM, ancestral DDPM, guidance) is in ``lightning_speed.solvers``.

With ``learn_sigma`` the network outputs 2C channels: the usual prediction and a variance
interpolation ``v``; the loss is improved DDPM's hybrid ``L_simple + lambda_vlb L_vlb`` (Nichol &
Dhariwal 2021, eq. 16), with the mean frozen in the VLB term so that only ``v`` learns from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_speed import variance
from lightning_speed.schedules import NoiseSchedule, Prediction, check_prediction
from lightning_speed.validation import check_bool, check_number, is_integer_tensor


Denoiser = Callable[[Tensor, Tensor], Tensor]
"""A network as the process sees it: ``model(x_t, t) -> output`` (C channels, 2C with learned sigma)."""


class DiffusionLosses(NamedTuple):
    """Per-sample training losses, each shaped (B,); the hybrid objective is ``mse + vlb``.

    ``mse``: mean squared error of the prediction (``L_simple``).
    ``vlb``: ``lambda_vlb * T * L_t`` with ``L_t`` the VLB term at t in bits per dimension, computed
    with the mean frozen (None without learned sigma). ``T * L_t`` is the one-sample estimate of the
    whole bound ``L_vlb = sum_t L_t`` under uniform t, as in improved DDPM.
    """

    mse: Tensor
    vlb: Tensor | None = None


def expand(values: Tensor, like: Tensor) -> Tensor:
    """Reshape per-sample values (B,) to broadcast against ``like`` (B, ...)."""
    return values.view(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Forward process, targets and training loss of a discrete DDPM schedule.

    Args:
        schedule: the noise schedule (T steps, alpha_bar may reach 0 at T-1: zero terminal SNR).
        prediction: what the network predicts: ``epsilon``, ``v`` or ``x0``.
        learn_sigma: the network also outputs the variance interpolation (improved DDPM).
        lambda_vlb: weight of ``L_vlb`` in the hybrid loss; improved DDPM's 0.001. The per-sample VLB
            term is then ``0.001 * T * L_t``: improved-diffusion's ``vb * num_timesteps / 1000``
            (``rescale_learned_sigmas``), and at T = 1000 DiT's and the official SpeeD code's ``vb``.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: Prediction = "epsilon",
        learn_sigma: bool = False,
        lambda_vlb: float = 0.001,
    ) -> None:
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            hint = " (a FlowSchedule is rectified flow's: use flow.RectifiedFlow)" if hasattr(schedule, "shift") else ""
            raise TypeError(
                f"GaussianDiffusion needs a NoiseSchedule, got {type(schedule).__name__}{hint}: build one with "
                "NoiseSchedule.create('linear', 1000) (a name or a list of betas) or schedules.as_schedule(...)."
            )
        check_prediction(prediction)
        ab = schedule.alpha_bar
        if prediction == "epsilon" and ab[-1] == 0:
            raise ValueError(
                "The schedule has zero terminal SNR (alpha_bar = 0 at t = T-1), where an epsilon prediction "
                "carries no information about x0, so no image can be generated from it: use prediction 'v' "
                "(as diffusers recommends with rescale_betas_zero_snr) or 'x0'."
            )
        self.schedule = schedule
        self.prediction = prediction
        self.learn_sigma = check_bool(learn_sigma, "learn_sigma")
        self.lambda_vlb = check_number(lambda_vlb, "lambda_vlb", at_least=0.0)
        self.num_timesteps = schedule.num_timesteps
        # Non-persistent: derived from the schedule, so checkpoints stay small and portable.
        for name, table in self._tables(torch.float32).items():
            self.register_buffer(name, table, persistent=False)

    def _tables(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The schedule's tables by buffer name, in ``dtype``; with learned sigma also improved DDPM's posterior and
        learned-variance range."""
        ab = self.schedule.alpha_bar
        tables = {"alpha_bar": ab, "sqrt_alpha_bar": ab.sqrt(), "sqrt_one_minus_alpha_bar": (1 - ab).sqrt()}
        if self.learn_sigma:
            posterior = variance.posterior_tables(self.schedule)._asdict()
            tables.update((f"posterior_{field}", table) for field, table in posterior.items())
        return {name: table.to(dtype) for name, table in tables.items()}

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GaussianDiffusion:
        """The tables follow device moves, but a cast of the whole model (precision="bf16-true" casts every buffer)
        rebuilds them from the schedule, never narrower than float32: in bf16, sqrt(alpha_bar_t) rounds to 1 for
        t < 15 and DDIM-250 changes its samples' spread by up to 2 %."""
        super()._apply(fn, recurse)
        dtype = self.alpha_bar.dtype
        if dtype != torch.float32:
            device = self.alpha_bar.device
            for name, table in self._tables(torch.promote_types(dtype, torch.float32)).items():
                setattr(self, name, table.to(device))
        return self

    # -- forward process and targets ------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        return expand(self.sqrt_alpha_bar[t], x0) * x0 + expand(self.sqrt_one_minus_alpha_bar[t], x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output for this parameterisation."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "x0":
            return x0
        # v = sqrt(ab) eps - sqrt(1 - ab) x0  (Salimans & Ho 2022)
        return expand(self.sqrt_alpha_bar[t], x0) * noise - expand(self.sqrt_one_minus_alpha_bar[t], x0) * x0

    def split_prediction(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return (x0_hat, eps_hat) implied by the network's prediction (C channels) at x_t."""
        a = expand(self.sqrt_alpha_bar[t], x_t)
        s = expand(self.sqrt_one_minus_alpha_bar[t], x_t)
        if self.prediction == "epsilon":
            return (x_t - s * out) / a, out
        if self.prediction == "x0":
            return out, (x_t - a * out) / s
        return a * x_t - s * out, s * x_t + a * out  # v

    def check_output(self, out: Any, x: Tensor) -> Tensor:
        """``out`` if it is what the loss and the solvers read from the network at input ``x``: a floating
        tensor of x's shape, with 2C channels for learned sigma. Host metadata only: free, and under
        ``torch.compile`` checked once, at tracing."""
        if not isinstance(out, Tensor):
            raise TypeError(
                f"The network (backbone) must return the prediction as a tensor, got {type(out).__name__}: return "
                "the tensor itself (from a diffusers model, its `.sample`, or [0] with return_dict=False)."
            )
        if not out.is_floating_point():
            raise TypeError(
                f"The network (backbone) must return floating-point predictions, got {out.dtype}: remove any "
                "rounding, argmax or integer cast at its output (the loss needs gradients through it)."
            )
        channels = x.shape[1] * (2 if self.learn_sigma else 1)
        expected = (x.shape[0], channels, *x.shape[2:])
        if tuple(out.shape) == expected:
            return out
        if out.shape[2:] != x.shape[2:] or out.shape[0] != x.shape[0]:
            fix = f"it must keep the input's batch size and size {tuple(x.shape[2:])} (check its image_size and resampling)"
        else:
            fix = f"set its out_channels to {channels}"
            if out.shape[1] == x.shape[1] * (1 if self.learn_sigma else 2):  # the other learn_sigma convention
                fix += f", or learn_sigma={not self.learn_sigma} in the model to match it"
        need = f"2C = {channels} channels (prediction and variance) for learn_sigma" if self.learn_sigma \
            else f"the data's {channels} channels"
        raise ValueError(
            f"The network (backbone) must return {need}, shaped {expected} for input {tuple(x.shape)}; got "
            f"{tuple(out.shape)}: {fix}."
        )

    # -- the loss ------------------------------------------------------------------------------
    def check_device(self, x0: Tensor, t: Tensor) -> None:
        """``x0`` and ``t`` on the device of the schedule's tables, which they index and scale (host metadata only)."""
        tables = self.alpha_bar.device
        if x0.device != tables or t.device != tables:
            raise RuntimeError(
                f"The diffusion's schedule tables are on {tables} but the images are on {x0.device} and the time steps "
                f"on {t.device}: move the module to the data's device, module.to({str(x0.device)!r}) (the Trainer "
                "does), and draw t on it, e.g. timesteps.sample(len(x0), x0.device)."
            )

    def check_steps(self, t: Any, batch: int) -> None:
        """``t`` an integer tensor (B,) of steps in [0, T - 1], which index the tables (a negative one would wrap to
        the end); values read on the CPU only (free there, a sync on an accelerator), as the flow's times are."""
        if not is_integer_tensor(t):
            what = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"A DDPM trains on integer time steps in [0, {self.num_timesteps - 1}], got {what}: draw them with "
                "TimestepStrategy(schedule).sample (float times in [0, 1] are flow times: process='flow')."
            )
        if tuple(t.shape) != (batch,):
            raise ValueError(f"The time steps must be shaped ({batch},), one per image, got {tuple(t.shape)}.")
        # (not while compiling: reading the values would break the compiled graph, on the CPU too)
        if t.device.type == "cpu" and t.numel() > 0 and not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.aminmax(t))
            if low < 0 or high >= self.num_timesteps:
                raise ValueError(
                    f"A DDPM of T = {self.num_timesteps} steps trains on time steps in [0, {self.num_timesteps - 1}], "
                    f"got values from {low} to {high}: draw them with TimestepStrategy(schedule).sample."
                )

    def training_losses(self, model: Denoiser, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> DiffusionLosses:
        """Per-sample losses of ``model`` at time steps ``t`` (B,), in float32 whatever the autocast."""
        self.check_steps(t, x0.shape[0])
        self.check_device(x0, t)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = self.check_output(model(x_t, t), x0).float()
        prediction, v = out.split(x0.shape[1], dim=1) if self.learn_sigma else (out, None)
        mse = variance.mean_over_sample((prediction - self.target(x0, noise, t).float()) ** 2)
        if v is None:
            return DiffusionLosses(mse)
        # The model's p(x_{t-1} | x_t): posterior mean at the predicted x0, learned variance. vlb_terms
        # detaches the mean, so the VLB trains only the variance (improved DDPM, section 3.1).
        x0_hat, _ = self.split_prediction(prediction, x_t, t)
        tables = self.posterior
        mean = variance.posterior_mean(tables, x0_hat, x_t, t)
        vlb = variance.vlb_terms(tables, x0.float(), x_t.float(), t, mean, variance.learned_log_variance(tables, v, t))
        return DiffusionLosses(mse, vlb * (self.lambda_vlb * self.num_timesteps))

    @property
    def posterior(self) -> variance.PosteriorTables:
        """The posterior tables of q(x_{t-1} | x_t, x0) on the model's device (learned sigma only)."""
        return variance.PosteriorTables(*(getattr(self, f"posterior_{f}") for f in variance.PosteriorTables._fields))
