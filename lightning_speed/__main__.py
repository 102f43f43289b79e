from lightning_speed.cli import console

console(prog="python -m lightning_speed")
