from lightning_speed.cli import console

console()
