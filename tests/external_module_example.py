"""SpeeD in your own LightningModule: a plain DDPM module plus three lines, each marked "SpeeD"."""
import lightning.pytorch as pl
import torch
from torch import nn

from lightning_speed.callbacks import SpeeD
from lightning_speed.timesteps import TimestepStrategy


class MyDiffusion(pl.LightningModule):
    """Epsilon prediction on 2-D points with DDPM's linear schedule."""

    def __init__(self, num_timesteps: int = 1000) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 64), nn.SiLU(), nn.Linear(64, 2))
        betas = torch.linspace(1e-4, 0.02, num_timesteps)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, dim=0))
        self.timesteps = TimestepStrategy(self.alphas_cumprod)  # SpeeD: the callback installs its strategies here

    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        t = self.timesteps.sample(len(x0), x0.device)  # SpeeD: instead of torch.randint(0, T, (len(x0),), device=x0.device)
        ab = self.alphas_cumprod[t].unsqueeze(1)
        noise = torch.randn_like(x0)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = self.net(torch.cat([x_t, t.unsqueeze(1) / len(self.alphas_cumprod)], dim=1))
        per_sample_mse = (pred - noise).pow(2).mean(dim=1)
        return self.timesteps.loss(t, per_sample_mse)  # SpeeD: instead of per_sample_mse.mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main(max_steps: int = 500, **trainer_kwargs) -> MyDiffusion:
    points = torch.randn(1024, 2) * 0.5 + torch.tensor([1.0, -1.0])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(points), batch_size=64, shuffle=True)
    model = MyDiffusion()
    pl.Trainer(max_steps=max_steps, callbacks=[SpeeD(tau=700, k=5, lam=0.6)], **trainer_kwargs).fit(model, loader)
    return model


if __name__ == "__main__":
    main()
