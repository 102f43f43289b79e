from lightning_speed.cli import main

main()
