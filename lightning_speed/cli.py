"""The ``lightning-speed`` command: LightningCLI over DiffusionModule and our data modules.

``lightning-speed fit --config configs/quickstart.yaml`` trains; every constructor argument
of the model, the data module and the callbacks can be set from YAML or the command line,
and ``--print_config`` shows them all.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_speed.module import DiffusionModule


class SpeedCLI(LightningCLI):
    """LightningCLI with TensorBoard logging by default and the data's shape linked into the model."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "lightning_speed"},
                }
            }
        )

    def before_fit(self) -> None:
        """Under ``fast_dev_run`` write no checkpoint.

        Lightning 2.6's ``ModelCheckpoint(save_last=True)`` still saves ``last.ckpt`` at train end
        in a fast_dev_run, and with the logger disabled that lands in ``./checkpoints``.
        """
        if self.trainer.fast_dev_run:
            for callback in self.trainer.checkpoint_callbacks:
                if hasattr(callback, "save_last"):
                    callback.save_last = False


def main(args: list[str] | None = None, run: bool = True) -> SpeedCLI:
    """Build (and by default run) the CLI; returns it, so scripts can read its trainer and model.

    ``run=False`` parses and instantiates without running (``args`` then has no subcommand),
    for scripts that adjust the trainer before calling ``fit`` themselves.
    """
    return SpeedCLI(
        DiffusionModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,  # None: LightningCLI reads sys.argv itself (passing it too makes it warn)
        auto_configure_optimizers=False,
        run=run,
    )


def console() -> None:
    """The ``lightning-speed`` command and ``python -m lightning_speed``.

    Returns None: the console-script wrapper calls ``sys.exit(console())``, and a returned CLI
    object would make every successful run exit with status 1.
    """
    main()


if __name__ == "__main__":
    console()
