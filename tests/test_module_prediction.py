"""What ``DiffusionModule``'s hyperparameters record as ``prediction``: a DDPM's (epsilon by default), and None on a
flow, whose network predicts the velocity; checkpoints of flows that record 'epsilon' still load and resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.core.saving import load_hparams_from_yaml
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_speed.cli import main
from lightning_speed.module import DiffusionModule

from _fixtures import blob_loader, cpu_trainer, one_conv  # pytest puts tests/ on sys.path (no __init__.py there)

SHAPE = (1, 8, 8)
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.parametrize(("kwargs", "recorded"), [
    ({"process": "flow"}, None),
    ({"process": "flow", "prediction": "epsilon"}, None),  # what checkpoints of flows may record
    ({}, "epsilon"),
    ({"prediction": "v"}, "v"),
    ({"prediction": "x0"}, "x0"),
])
def test_the_hyperparameters_record_what_the_network_predicts(kwargs, recorded) -> None:
    module = DiffusionModule(one_conv(), image_shape=SHAPE, **kwargs)
    assert module.hparams["prediction"] == recorded and module.hparams_initial["prediction"] == recorded
    if module.process == "ddpm":
        assert module.diffusion.prediction == module.timesteps.prediction == recorded
    else:
        assert module.timesteps.prediction == "velocity"


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_a_flow_refuses_a_prediction_it_would_ignore(prediction) -> None:
    with pytest.raises(ValueError, match=rf"prediction='{prediction}' does not apply to process='flow': a flow's "
                                         r"network predicts the velocity eps - x0. Leave prediction at its default "
                                         r"\(None\), or use process='ddpm'"):
        DiffusionModule(one_conv(), process="flow", prediction=prediction, image_shape=SHAPE)


def test_a_flow_fit_writes_no_prediction_to_hparams_yaml(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="flow", version=0)
    module = DiffusionModule(one_conv(), process="flow", image_shape=SHAPE)
    cpu_trainer(max_steps=1, logger=logger).fit(module, blob_loader(n=8, batch_size=8))
    hparams = load_hparams_from_yaml(tmp_path / "flow" / "version_0" / "hparams.yaml")
    assert hparams["process"] == "flow" and hparams["prediction"] is None


def test_a_flow_checkpoint_that_records_epsilon_loads(tmp_path: Path) -> None:
    trained = DiffusionModule(one_conv(), process="flow", image_shape=SHAPE)
    run = cpu_trainer(max_steps=1)
    run.fit(trained, blob_loader(n=8, batch_size=8))
    path = tmp_path / "flow.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"]["prediction"] = "epsilon"
    torch.save(checkpoint, path)

    loaded = DiffusionModule.load_from_checkpoint(path, backbone=one_conv())
    assert loaded.process == "flow" and loaded.hparams["prediction"] is None
    torch.testing.assert_close(loaded.state_dict(), trained.state_dict())


def test_resuming_a_flow_checkpoint_that_records_epsilon(cli_env: Path) -> None:
    """``lightning-speed fit --ckpt_path``: LightningCLI passes the checkpoint's prediction to the module."""
    run = ["fit", "--config", str(QUICKSTART), "--model.process", "flow", "--model.prediction", "null",
           "--timesteps", "null", "--samples", "null", "--fid", "null", "--trainer.accelerator", "cpu",
           "--trainer.max_steps", "1", "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--model.backbone.init_args.base_channels", "8", "--data.init_args.batch_size", "4",
           "--checkpoint.init_args.dirpath", str(cli_env / "ckpt")]
    main(run)
    path = cli_env / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["hyper_parameters"]["prediction"] is None
    checkpoint["hyper_parameters"]["prediction"] = "epsilon"
    torch.save(checkpoint, path)

    with warnings.catch_warnings(record=True) as caught:  # a configured None is no other choice than 'epsilon'
        warnings.simplefilter("always")
        cli = main([*run, "--trainer.max_steps", "2", "--ckpt_path", str(path)])
    assert not [w for w in caught if "other model hyperparameters" in str(w.message)]
    assert cli.trainer.global_step == 2 and cli.model.process == "flow" and cli.model.hparams["prediction"] is None
    assert torch.load(path, weights_only=False)["hyper_parameters"]["prediction"] is None  # saved again, as None
