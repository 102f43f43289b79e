"""The shipped configs: their composition rules, and one CPU training step of every combination.

A base per data/model setup (``configs/<base>.yaml``; the paper's latent recipe in ``configs/paper/``) composes with one small file per strategy or
ablation (``configs/strategies/``, ``configs/ablations/``) and optionally a schedule
(``configs/schedules/``): ``lightning-speed fit --config <base> --config <strategy>``. A flow base
(``model.process: flow``) composes with the shared strategy files that have a flow form and with ``configs/flow/``
(flow-only strategies and a time shift). The files below are found by glob, so a new one is tested without editing
this file.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

import lightning_speed.timesteps as timesteps_module
from benchmarks.common import smoke_args
from benchmarks.convergence.runs import FLOW_STUDY, STUDY as STUDY_RUNS
from conftest import have_fashion_mnist  # pytest puts tests/ on sys.path (no __init__.py there)
from lightning_speed.callbacks import TimestepCallback
from lightning_speed.cli import SpeedCLI, main
from lightning_speed.data import ImageFolderDataModule
from lightning_speed.module import DiffusionModule

from _fixtures import write_fake_cifar, write_image_folder, write_tiny_autoencoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
BASES = sorted(p for p in CONFIGS.glob("*.yaml") if p != QUICKSTART)
PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))  # the paper's recipe on latents of a user's image folder
PAPER_STRATEGIES = ("uniform", "speed", "speed_k2")  # what the paper compares
INPUTS = "inputs"  # data_args writes files a run reads here (a user's images, an autoencoder)
STRATEGIES = sorted((CONFIGS / "strategies").glob("*.yaml"))
ABLATIONS = sorted((CONFIGS / "ablations").glob("*.yaml"))
SCHEDULES = sorted((CONFIGS / "schedules").glob("*.yaml"))
MULTI_GPU = sorted((CONFIGS / "multi_gpu").glob("*.yaml"))
FSDP = CONFIGS / "multi_gpu" / "fsdp_dit_xl.yaml"  # Lightning runs FSDP on GPUs only: parsed here, not run
STUDY = sorted((CONFIGS / "study").glob("*.yaml"))  # the convergence study's candidates (tests/test_study_strategies.py)
FLOW = sorted((CONFIGS / "flow").glob("*.yaml"))
FLOW_STRATEGIES = [p for p in FLOW if "timesteps" in yaml.safe_load(p.read_text())]
FLOW_SHIFTS = [p for p in FLOW if p not in FLOW_STRATEGIES]
FLOW_BASES = [p for p in BASES if yaml.safe_load(p.read_text())["model"].get("process") == "flow"]
DDPM_BASES = [p for p in BASES if p not in FLOW_BASES]
DISCRETE_ONLY = ("speed", "speed_k2", "change_aware", "clts")  # strategies/ files with tau or mu in time steps
FLOW_SHARED = [p for p in STRATEGIES if p.stem not in DISCRETE_ONLY]  # strategies/ files that bind to a flow too


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def name(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


# ------------------------------------------------------------------------------ composition rules
def test_the_layout_is_complete() -> None:
    shipped = sorted(CONFIGS.rglob("*.yaml"))
    assert shipped == sorted([QUICKSTART, *BASES, *PAPER, *STRATEGIES, *ABLATIONS, *SCHEDULES, *MULTI_GPU, *STUDY,
                              *FLOW]), "a YAML outside the layout"
    assert {p.stem for p in MULTI_GPU} == {"ddp", "fsdp_dit_xl"}
    assert {p.stem for p in BASES} >= {"fashion_mnist", "fashion_mnist_dit", "cifar10", "fashion_mnist_sit"}
    assert [p.stem for p in FLOW_BASES] == ["fashion_mnist_sit"]
    assert {p.stem for p in FLOW_STRATEGIES} == {"mode", "cosmap"} and [p.stem for p in FLOW_SHIFTS] == ["shift3"]
    assert set(DISCRETE_ONLY) < {p.stem for p in STRATEGIES}
    assert {p.stem for p in PAPER} == {"ffhq", "metfaces"}
    assert {p.stem for p in STRATEGIES} == {
        "uniform", "speed", "speed_k2", "change_aware", "speed_auto", "p2", "min_snr", "logit_normal", "clts", "loss_aware",
    }  # fmt: skip


@pytest.mark.parametrize("path", [*STRATEGIES, *ABLATIONS, *FLOW_STRATEGIES], ids=name)
def test_a_strategy_file_holds_only_its_strategy_and_logger_name(path: Path) -> None:
    """Anything else in a strategy file would make runs of different strategies differ in more than the
    strategy. Every constructor argument is spelled out: when a later file changes ``timesteps``'s class,
    jsonargparse keeps the earlier class's values of arguments the new class shares (tau, k, ...)."""
    config = load(path)
    assert set(config) == {"timesteps", "trainer"}, f"{name(path)} sets more than the strategy: {sorted(config)}"
    assert config["trainer"] == {"logger": {"init_args": {"name": path.stem}}}
    strategy = config["timesteps"]
    if strategy is None:
        assert path.stem == "uniform"
        return
    assert set(strategy) == {"class_path", "init_args"}
    module, _, class_name = strategy["class_path"].rpartition(".")
    assert module == "lightning_speed.timesteps"
    cls = getattr(timesteps_module, class_name)
    assert issubclass(cls, timesteps_module.Strategy)
    parameters = {name for name, p in inspect.signature(cls.__init__).parameters.items()
                  if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}  # none: object's (*args, **kwargs)
    assert set(strategy["init_args"]) == parameters, f"{name(path)}: spell out exactly {sorted(parameters)}"
    TimestepCallback(cls(**strategy["init_args"]))  # valid values, one strategy per role


@pytest.mark.parametrize("path", [p for p in STRATEGIES if load(p)["timesteps"] is not None], ids=name)
def test_the_shared_strategy_files_run_on_a_flow_base_are_those_with_a_flow_form(path: Path) -> None:
    """FLOW_SHARED (combined with the flow base below) bind to a flow; DISCRETE_ONLY refuse, naming the flow."""
    from lightning_speed.flow import FlowSchedule

    spec = load(path)["timesteps"]
    strategy = getattr(timesteps_module, spec["class_path"].rsplit(".", 1)[-1])(**spec["init_args"])
    if path in FLOW_SHARED:
        strategy.bind(FlowSchedule())
    else:
        with pytest.raises(ValueError, match=r"flow|tau must be a number in \(0, 1\)"):
            strategy.bind(FlowSchedule())


@pytest.mark.parametrize("path", SCHEDULES, ids=name)
def test_a_schedule_file_changes_only_the_schedule(path: Path) -> None:
    assert load(path) == {"model": {"schedule": path.stem}}


@pytest.mark.parametrize("path", FLOW_SHIFTS, ids=name)
def test_a_shift_file_changes_only_the_flows_shift(path: Path) -> None:
    assert load(path) == {"model": {"shift": float(path.stem.removeprefix("shift"))}}


def test_the_flow_base_is_the_dit_base_as_a_flow() -> None:
    """Only what a flow changes differs from the DiT recipe: the process, the solvers, no learned variance, the runs'
    folder; the optimiser, EMA, compile settings, data, trainer and evaluation schedule are the same."""
    dit, sit = load(CONFIGS / "fashion_mnist_dit.yaml"), load(CONFIGS / "fashion_mnist_sit.yaml")
    assert {key for key in dit if dit[key] != sit[key]} == {"trainer", "samples", "fid", "final_fid", "model"}
    assert sit["trainer"]["logger"]["init_args"]["save_dir"] == "runs/fashion_mnist_sit"
    sit["trainer"]["logger"]["init_args"]["save_dir"] = dit["trainer"]["logger"]["init_args"]["save_dir"]
    assert sit["trainer"] == dit["trainer"]
    for key in ("samples", "fid", "final_fid"):
        assert sit[key]["init_args"]["solver"] in ("euler", "heun"), key
        assert {k for k in dit[key]["init_args"] if dit[key]["init_args"][k] != sit[key]["init_args"][k]} <= \
            {"solver", "solver_steps", "name"}, key
    assert sit["model"]["backbone"]["init_args"] == {**dit["model"]["backbone"]["init_args"], "learn_sigma": False}
    assert sit["model"]["process"] == "flow" and sit["model"]["shift"] == 1.0
    ddpm_only = {"schedule", "num_timesteps", "prediction", "learn_sigma"}
    assert {k: v for k, v in dit["model"].items() if k not in ddpm_only | {"backbone"}} == \
        {k: v for k, v in sit["model"].items() if k not in {"process", "shift", "backbone"}}


@pytest.mark.parametrize("path", [QUICKSTART, *BASES, *PAPER], ids=name)
def test_callbacks_use_their_own_keys(path: Path) -> None:
    """A callback with a top-level key never hides in trainer.callbacks, which a later file's list replaces."""
    config = load(path)
    own = {cls.__name__ for cls in SpeedCLI.CALLBACK_KEYS.values()} | {TimestepCallback.__name__}
    listed = [cb["class_path"].rsplit(".", 1)[-1] for cb in config.get("trainer", {}).get("callbacks") or []]
    assert not own & set(listed), f"{name(path)} lists {own & set(listed)} in trainer.callbacks"
    assert {"monitor", "ema", "samples", "fid", "checkpoint", "timesteps"} <= set(config)
    if path != QUICKSTART:
        assert config["timesteps"] is None  # a base trains uniform t; the strategy comes from a strategy file


def test_composition_merges_later_files_into_the_top_level_keys(cli_env: Path) -> None:
    """The CLI's own parse of base + strategy: the strategy and logger name come from the strategy file,
    everything else from the base; a later file replaces a strategy by null; options override last."""
    base, speed, uniform = (CONFIGS / f for f in ("fashion_mnist.yaml", "strategies/speed.yaml", "strategies/uniform.yaml"))
    small = smoke_args(load(base)["model"]["backbone"]["class_path"])
    config = main(["--config", str(base), "--config", str(speed), *small], run=False).config
    assert config.timesteps.class_path == "lightning_speed.timesteps.SpeeD"
    assert dict(config.timesteps.init_args) == {"tau": 700, "k": 5.0, "dual": True, "lam": 0.6}
    assert config.trainer.logger.init_args.save_dir == "runs/fashion_mnist"
    assert config.trainer.logger.init_args.name == "speed"
    assert config.fid.init_args.num_samples == load(base)["fid"]["init_args"]["num_samples"]
    assert [cb.class_path for cb in config.trainer.callbacks] == ["lightning.pytorch.callbacks.LearningRateMonitor"]
    cli = main(["--config", str(base), "--config", str(speed), "--config", str(uniform), "--ema.init_args.decay", "0.5",
                *small], run=False)
    assert cli.config.timesteps is None and cli.config.trainer.logger.init_args.name == "uniform"
    assert not any(isinstance(cb, TimestepCallback) for cb in cli.trainer.callbacks)  # null adds no callback
    (ema,) = (cb for cb in cli.trainer.callbacks if type(cb).__name__ == "EMAWeightAveraging")
    assert ema.decay == 0.5


# ------------------------------------------------------------------------------- one step of each
def combinations() -> list[tuple[str, ...]]:
    """Every shipped way to train: each base with each strategy, ablations and schedules on the
    Fashion-MNIST base (they are studied there), the paper's FFHQ base with the strategies the paper compares
    (the other paper bases, which differ in folders only, with SpeeD), and the quickstart alone."""
    fashion = CONFIGS / "fashion_mnist.yaml"
    runs = [(name(base), name(s)) for base in DDPM_BASES for s in STRATEGIES]
    runs += [(name(base), name(s)) for base in FLOW_BASES for s in [*FLOW_SHARED, *FLOW_STRATEGIES]]
    runs += [(name(base), "strategies/logit_normal.yaml", name(s)) for base in FLOW_BASES for s in FLOW_SHIFTS]
    runs += [(name(base), f"strategies/{s}.yaml") for base in PAPER for s in (PAPER_STRATEGIES if base.stem == "ffhq" else ["speed"])]
    runs += [(name(fashion), name(a)) for a in ABLATIONS]
    runs += [(name(fashion), "strategies/speed_auto.yaml", name(s)) for s in SCHEDULES]
    runs += [(name(base), "strategies/speed.yaml", name(m)) for base in BASES for m in MULTI_GPU if m != FSDP
             if base.stem in ("fashion_mnist", "fashion_mnist_dit")]
    runs += [("fashion_mnist_dit.yaml", *files) for files in STUDY_RUNS.values()]  # the base the study runs on
    runs += [(name(base), *STUDY_RUNS[run]) for base in FLOW_BASES for run in FLOW_STUDY]
    return [(name(QUICKSTART),), *runs]


def data_args(config: dict[str, Any], tmp_path: Path) -> list[str]:
    """Small, offline, CPU data for the data module of ``config``; skip when real files are missing."""
    cls, init = config["data"]["class_path"].rsplit(".", 1)[-1], config["data"].get("init_args") or {}
    small = ["--data.init_args.batch_size", "4", "--data.init_args.val_images", "4"]
    if cls == "EmbeddedFashionMNISTDataModule":
        return small
    if cls == "FashionMNISTDataModule":
        if init.get("root") is None and not have_fashion_mnist():
            pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
        return [*small, "--data.init_args.on_device", "false"]
    if cls == "CIFAR10DataModule":
        write_fake_cifar(tmp_path / "cifar", per_batch=4, n_test=8)
        return [*small, "--data.init_args.root", str(tmp_path / "cifar"), "--data.init_args.download", "false",
                "--data.init_args.num_workers", "0"]
    if cls == "LatentDataModule":  # a tiny random AutoencoderKL folder and 64 px images: 4x32x32 latents, as at 256 px
        pytest.importorskip("diffusers")
        inputs = tmp_path / INPUTS
        vae, images = write_tiny_autoencoder(inputs / "vae"), write_image_folder(inputs / "images", n=8, size=64)
        return ["--data.init_args.batch_size", "4", "--data.init_args.autoencoder", str(vae),
                "--data.init_args.cache_dir", str(tmp_path / "latents"), "--data.init_args.images.init_args.root", str(images),
                "--data.init_args.images.init_args.image_size", "64", "--data.init_args.images.init_args.num_workers", "0"]
    pytest.fail(f"test_configs.py cannot run {cls} offline on a CPU: add it to data_args")


@pytest.fixture(scope="module")
def decoded_idx() -> dict[Path, Any]:
    """IDX arrays by file, as ``read_idx`` decoded them: the combinations train on the same Fashion-MNIST files."""
    return {}


def merged(earlier: Any, later: Any) -> Any:
    """A later config file's values over an earlier one's, mappings merged key by key (as the CLI composes them)."""
    if isinstance(earlier, dict) and isinstance(later, dict):
        return {**earlier, **{key: merged(earlier.get(key), value) for key, value in later.items()}}
    return later


@pytest.mark.parametrize("files", combinations(), ids="+".join)
def test_every_shipped_combination_trains_one_cpu_step(files: tuple[str, ...], cli_env: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       decoded_idx: dict[Path, Any]) -> None:
    """One fast_dev_run step through the real CLI, the configs shrunk only in size (tiny backbone of the
    same class, batch 4, fp32, eager, FID features offline); the installed strategy is the file's."""
    from lightning_speed.data import fashion_mnist

    def no_sampling(self: DiffusionModule, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a callback generated images in a fast_dev_run (FID / sample grids must skip it)")

    read_idx = fashion_mnist.read_idx

    def read_once(path: Path) -> Any:
        """Decoding the gzip files takes half a second per run; the data module pads the 28 x 28 images into new
        32 x 32 tensors and converts the labels, so the shared arrays stay as read."""
        if Path(path) not in decoded_idx:
            decoded_idx[Path(path)] = read_idx(path)
        return decoded_idx[Path(path)]

    monkeypatch.setattr(fashion_mnist, "read_idx", read_once)
    monkeypatch.setattr(DiffusionModule, "sample", no_sampling)
    composed: dict[str, Any] = {}
    for file in files:
        composed = merged(composed, load(CONFIGS / file))
    if composed["data"]["class_path"].endswith(".LatentDataModule"):  # the encoding streams the image folder

        def whole_split(self: ImageFolderDataModule, split: str) -> None:
            raise AssertionError(f"the image folder's whole {split} split was decoded (a latent cache streams it)")

        monkeypatch.setattr(ImageFolderDataModule, "_load_split", whole_split)
    args = ["fit", *(a for f in files for a in ("--config", str(CONFIGS / f))),
            "--trainer.fast_dev_run", "true", "--trainer.logger.init_args.save_dir", str(cli_env / "runs"),
            *smoke_args(composed["model"]["backbone"]["class_path"]), *data_args(composed, cli_env)]
    for key in ("fid", "final_fid"):
        if composed.get(key):  # the offline feature network: the standard Inception needs a download
            args += [f"--{key}.init_args.feature_extractor", "fashion_mnist"]
    if any(f.startswith("multi_gpu/") for f in files):  # its strategy on one CPU process (gloo)
        args += ["--trainer.devices", "1"]
    cli = main(args)
    trainer, model = cli.trainer, cli.model
    assert trainer.fast_dev_run and trainer.global_step == 1

    installed = [cb for cb in trainer.callbacks if isinstance(cb, TimestepCallback)]
    strategy = composed["timesteps"]
    if strategy is None:
        assert installed == []
        assert type(model.timesteps.sampler).__name__ == "UniformSampling"
        assert type(model.timesteps.weights).__name__ == "ConstantWeighting"
    else:
        (cb,) = installed
        given = strategy if isinstance(strategy, list) else [strategy]  # one strategy, or one per role
        assert [type(s).__name__ for s in cb.strategies] == [s["class_path"].rsplit(".", 1)[-1] for s in given]
        assert model.timesteps.sampler is (cb.sampling or model.timesteps.sampler)
        assert model.timesteps.weights is (cb.weighting or model.timesteps.weights)
        assert cb.sampling or type(model.timesteps.sampler).__name__ == "UniformSampling"
        assert cb.weighting or type(model.timesteps.weights).__name__ == "ConstantWeighting"
    assert model.hparams.schedule == composed["model"].get("schedule", "linear")
    assert (model.process, model.hparams.shift) == (composed["model"].get("process", "ddpm"), composed["model"].get("shift", 1.0))
    for key in ("monitor", "ema", "samples", "fid", "final_fid"):  # each top-level callback key is one callback
        spec = composed.get(key)
        classes = [type(cb).__name__ for cb in trainer.callbacks]
        if spec:
            assert spec["class_path"].rsplit(".", 1)[-1] in classes, key
    if composed.get("ema"):  # the EMA's settings, a study file's included, reach the callback
        (ema,) = (cb for cb in trainer.callbacks if type(cb).__name__ == "EMAWeightAveraging")
        for name, value in composed["ema"].get("init_args", {}).items():
            assert getattr(ema, name) == value, name
    assert "fid" not in trainer.callback_metrics  # fast_dev_run: no FID, no grids, no checkpoints
    written = [p for p in cli_env.rglob("*") if p.suffix in (".ckpt", ".png") and cli_env / INPUTS not in p.parents]
    assert written == [], f"fast_dev_run wrote {written}"


@pytest.mark.parametrize(("files", "match"), [
    pytest.param(("fashion_mnist_sit.yaml", "strategies/speed.yaml"), r"tau .*700 looks like a discrete time step.*'auto'",
                 id="flow+speed"),
    pytest.param(("fashion_mnist_dit.yaml", "flow/mode.yaml"), r"ModeSampling.*flow", id="ddpm+mode"),
    *(pytest.param(("fashion_mnist_sit.yaml", *files), r"700 looks like a discrete time step|CLTSSampling has no flow form",
                   id=f"flow+{run}") for run, files in STUDY_RUNS.items() if run not in FLOW_STUDY),
])
def test_a_strategy_file_of_the_other_process_fails_before_the_first_step(files: tuple[str, ...], match: str,
                                                                         cli_env: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A discrete-only strategy (tau in time steps) on a flow base, and a flow-only one on a DDPM base: a clear error at
    setup, before any training step."""

    def training_step(self: DiffusionModule, batch: Any, batch_idx: int) -> None:
        raise AssertionError("a training step ran before the configuration error was reported")

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    base = load(CONFIGS / files[0])
    args = ["fit", *(a for f in files for a in ("--config", str(CONFIGS / f))), "--trainer.fast_dev_run", "true",
            "--trainer.logger.init_args.save_dir", str(cli_env / "runs"),
            *smoke_args(base["model"]["backbone"]["class_path"]), *data_args(base, cli_env)]
    with pytest.raises(ValueError, match=match):
        main(args)


# ------------------------------------------------------------------------------------ several GPUs
def test_multi_gpu_files_hold_only_what_differs_from_a_base() -> None:
    """They compose last: the trainer's strategy and devices, the settings that depend on them, nothing else."""
    for path in MULTI_GPU:
        config = load(path)
        assert set(config) <= {"trainer", "model", "data", "ema", "samples", "fid", "final_fid"}, name(path)
        assert set(config["trainer"]) == {"devices", "strategy"}, name(path)
        assert "timesteps" not in config  # the time-step strategy comes from configs/strategies/


def test_ddp_file_builds_the_sync_free_ddp_strategy_with_its_options(cli_env: Path) -> None:
    base = CONFIGS / "fashion_mnist.yaml"
    small = smoke_args(load(base)["model"]["backbone"]["class_path"])
    cli = main(["--config", str(base), "--config", str(CONFIGS / "multi_gpu" / "ddp.yaml"), *small,
                "--trainer.devices", "1"], run=False)
    from lightning_speed.distributed import SyncFreeDDPStrategy

    strategy = cli.trainer.strategy
    assert type(strategy) is SyncFreeDDPStrategy and strategy.sigterm_check_lag > 0
    options = load(CONFIGS / "multi_gpu" / "ddp.yaml")["trainer"]["strategy"]["init_args"]
    assert {k: strategy._ddp_kwargs[k] for k in options} == options
    # The base config's compile mode stays: CUDA graphs measured fastest under DDP for the UNet (BENCHMARKS.md, section 6).
    assert "compile_mode" not in (load(CONFIGS / "multi_gpu" / "ddp.yaml").get("model") or {})


class _ParseOnlyCLI(SpeedCLI):
    """Instantiates everything but the Trainer (Lightning refuses FSDP without a GPU)."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        return None


def test_fsdp_file_builds_lightnings_fsdp_strategy_for_dit_xl(cli_env: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_speed.backbones.dit import DiTBlock
    from lightning_speed.cli import RunConfigCallback, SpeedArgumentParser

    dit = CONFIGS / "fashion_mnist_dit.yaml"
    files = [dit, CONFIGS / "strategies" / "speed.yaml", FSDP]
    cli = _ParseOnlyCLI(DiffusionModule, subclass_mode_data=True, parser_class=SpeedArgumentParser,
                        save_config_callback=RunConfigCallback, auto_configure_optimizers=False, run=False,
                        args=[a for f in files for a in ("--config", str(f))] + smoke_args(load(dit)["model"]["backbone"]["class_path"]))
    assert cli.config.model.backbone.init_args.preset == "DiT-XL/2"
    strategy = cli.config_init.trainer.strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {DiTBlock}  # ModuleWrapPolicy
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {DiTBlock}
    assert strategy.kwargs["use_orig_params"] is True
    assert cli.config.timesteps.class_path == "lightning_speed.timesteps.SpeeD"
    assert cli.config.ema.init_args.decay == 0.9999  # the base's EMA, averaged per shard (test_ema.py, test_fsdp.py)
    assert cli.config.fid is None and cli.config.samples is None and cli.config.final_fid is None  # no sampling


def test_a_backbone_that_cannot_take_the_latents_fails_before_any_encoding(cli_env: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A paper config's DiT given in_channels 1 for 4-channel latents: refused before the image folder is encoded
    (LatentDataModule encodes it in prepare_data, which Lightning runs before the model's own setup check)."""
    from lightning_speed.autoencoders import Autoencoder

    def encode(self: Any, images: Any) -> None:
        raise AssertionError("the image folder was encoded before the backbone was checked")

    monkeypatch.setattr(Autoencoder, "encode", encode)
    files = ("paper/ffhq.yaml", "strategies/uniform.yaml")
    composed = {k: v for f in files for k, v in load(CONFIGS / f).items()}
    args = ["fit", *(a for f in files for a in ("--config", str(CONFIGS / f))), "--trainer.fast_dev_run", "true",
            "--trainer.logger.init_args.save_dir", str(cli_env / "runs"),
            *smoke_args(composed["model"]["backbone"]["class_path"]), *data_args(composed, cli_env),
            "--model.backbone.init_args.in_channels", "1"]
    with pytest.raises(ValueError, match=r"The backbone DiT cannot process images of shape \(4, 32, 32\).*set in_channels"):
        main(args)
    assert not any((cli_env / "latents").glob("posterior-*.npy"))
