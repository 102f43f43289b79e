"""Adopting SpeeD in your own LightningModule: expose the schedule, draw t and weight the loss."""
import lightning.pytorch as pl
import torch
from torch import nn

from lightning_speed.callbacks import AsymmetricTimestepSampling, ChangeAwareWeighting
from lightning_speed.timesteps import ConstantWeighting, UniformSampler, weighted_loss


class MyDiffusion(pl.LightningModule):
    """A toy epsilon-prediction model of 2-D points; any LightningModule adopts SpeeD the same way."""

    def __init__(self, num_timesteps: int = 1000) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 2))
        betas = torch.linspace(1e-4, 0.02, num_timesteps)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0))  # the callbacks read it
        self.timestep_sampler = UniformSampler(num_timesteps)  # the callbacks replace these two
        self.loss_weighting = ConstantWeighting()

    def on_fit_start(self) -> None:  # strategies are plain objects: keep them next to the model
        self.timestep_sampler.to(self.device)
        self.loss_weighting.to(self.device)

    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        t = self.timestep_sampler.sample(x0.shape[0])
        ab = self.alphas_cumprod[t].unsqueeze(1)
        noise = torch.randn_like(x0)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = self.net(torch.cat([x_t, t.unsqueeze(1) / len(self.alphas_cumprod)], dim=1))
        per_sample_loss = (pred - noise).pow(2).mean(dim=1)
        loss, w = weighted_loss(self.timestep_sampler, self.loss_weighting, t, per_sample_loss)
        return {"loss": loss, "t": t, "per_sample_loss": per_sample_loss.detach(), "weight": w.detach()}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main(max_steps: int = 500, **trainer_kwargs) -> MyDiffusion:
    points = torch.randn(1024, 2) * 0.5 + torch.tensor([1.0, -1.0])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(points), batch_size=64, shuffle=True)
    model = MyDiffusion()
    speed = [AsymmetricTimestepSampling(tau=700, k=5), ChangeAwareWeighting(lam=0.6, tau=700)]
    pl.Trainer(max_steps=max_steps, callbacks=speed, **trainer_kwargs).fit(model, loader)
    return model


if __name__ == "__main__":
    main()
