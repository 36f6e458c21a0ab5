import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST_TRAIN, make_train_test
from deepcovid.checkpoint import read_checkpoint
from deepcovid.data import load_splits
from deepcovid.training import fit, predict_samples, resolve_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def probe():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import probe_tta_views

    return probe_tta_views


def test_view_sets(probe):
    sets = probe.view_sets([0.9, 1.0, 1.1])
    assert list(sets) == ["none", "hflip", "hflip x zoom 0.9/1", "hflip x zoom 1/1.1", "hflip x zoom 0.9/1/1.1"]
    assert sets["hflip"] == [(1.0, False), (1.0, True)] and len(sets["hflip x zoom 0.9/1/1.1"]) == 6


def test_views_match_the_models_own_tta_and_the_table_is_printed(probe, tmp_path, capsys):
    data = make_train_test(tmp_path / "ds", 12, 4, size=48)
    cfg = resolve_config({**FAST_TRAIN, "epochs": 1, "threshold": "0.5"})
    fit({**cfg, "run_name": "r"}, data, tmp_path / "runs")
    ck = read_checkpoint(tmp_path / "runs" / "r" / "best.safetensors")
    splits = load_splits(data, val_fraction=cfg["val_fraction"], seed=cfg["seed"])
    y, views = probe.view_probabilities(ck, splits.test, [(1.0, False), (1.0, True), (0.9, False)])
    # the plain view is the model without TTA, plain + mirror is --tta hflip, a zoom is something else
    _, p_none, _ = predict_samples(ck, splits.test, cfg=cfg)
    ck.meta["tta"] = "hflip"
    _, p_flip, _ = predict_samples(ck, splits.test, cfg=cfg)
    np.testing.assert_allclose(views[(1.0, False)], p_none, atol=1e-6)
    np.testing.assert_allclose((views[(1.0, False)] + views[(1.0, True)]) / 2, p_flip, atol=1e-6)
    assert not np.allclose(views[(0.9, False)], p_none, atol=1e-4) and len(y) == 8

    assert probe.main(["--checkpoint", str(tmp_path / "runs" / "r"), "--scales", "0.9,1"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^\| (none|hflip|hflip x zoom 0\.9/1) \| (val|test) \|", out, flags=re.M)) == 6
    with pytest.raises(SystemExit):
        probe.main(["--checkpoint", str(tmp_path / "runs" / "r"), "--scales", "3"])
    assert probe.main(["--checkpoint", str(tmp_path / "nothing-here")]) == 2
