"""The keys FIDCallback logs under a name of its own, as docs/callbacks.md names them."""

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger

from test_fid_callback import FlatFeatures, TinyGenerator, datamodule, fid_callback, make_trainer  # tests/ on sys.path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_a_named_fid_callback_logs_its_kid_under_its_name_as_documented(tmp_path) -> None:
    fid = fid_callback(tmp_path, name="fid_b", compute_kid=True, kid_subset_size=8, feature_extractor=FlatFeatures(),
                       every_n_steps=1, on_train_end=False)
    logger = CSVLogger(tmp_path, name="csv")
    make_trainer(tmp_path, [fid], max_steps=1, logger=logger).fit(TinyGenerator(), datamodule=datamodule())
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = {key for row in rows for key, value in row.items() if value and key != "step"}
    assert logged == {"fid_b", "fid_b/seconds", "fid_b/kid_mean", "fid_b/kid_std"}
    text = (DOCS / "callbacks.md").read_text()
    assert "`<name>/kid_mean`" in text and "`<name>/seconds`" in text
