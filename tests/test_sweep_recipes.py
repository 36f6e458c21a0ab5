import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_recipe_sweep_runs_in_quick_mode(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sweep_recipes

    variants = {"base": {}, "no-aug": {"no_augment": True}}
    assert sweep_recipes.main(["--quick", "--variants", json.dumps(variants), "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in rows] == [("base", 0), ("base", 1), ("no-aug", 0), ("no-aug", 1)]
    for r in rows:
        assert set(r["val"]) == set(r["test"]) == {"accuracy", "f1", "specificity", "auc"}
        assert all(0 <= v <= 1 for v in r["test"].values()) and r["threshold"] == 0.5
    # each run trained its own model with its own seed, on the same validation split
    cfgs = [json.loads((tmp_path / "runs" / f"{v}-s{s}" / "config.json").read_text())
            for v in variants for s in (0, 1)]
    assert [c["seed"] for c in cfgs] == [0, 1, 0, 1] and {c["split_seed"] for c in cfgs} == {0}
    assert [c["no_augment"] for c in cfgs] == [False, False, True, True]
    probs = np.load(tmp_path / "probs.npz")
    assert len(probs["base/0/test/p"]) == len(probs["base/0/test/y"]) == 8
    assert not np.array_equal(probs["base/0/val/p"], probs["base/1/val/p"])
    out = capsys.readouterr().out
    assert len(re.findall(r"^\| base \(mean ± sd of 2 seeds\) \| (val|test) \|", out, flags=re.M)) == 2
    assert "| base (ensemble of seeds [0, 1]) | test |" in out
