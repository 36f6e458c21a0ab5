import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sweep_recipes():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import sweep_recipes

    return sweep_recipes


def test_recipe_sweep_runs_in_quick_mode(sweep_recipes, tmp_path, capsys):
    variants = {"base": {}, "no-aug": {"no_augment": True}}
    both = json.dumps({"both": ["base", "no-aug"]})
    assert sweep_recipes.main(["--quick", "--variants", json.dumps(variants), "--out", str(tmp_path),
                               "--ensembles", both]) == 0
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

    assert re.search(r"^\| both \(base \+ no-aug\) \| test \| ", out, flags=re.M), out

    # --summarize prints the same tables from the saved sweep and trains nothing
    runs_before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert sweep_recipes.main(["--out", str(tmp_path), "--summarize", "--ensembles", both]) == 0
    again = capsys.readouterr().out
    assert "| base (ensemble of seeds [0, 1]) | test |" in again
    assert [line for line in again.splitlines() if line.startswith("| both")] == [
        line for line in out.splitlines() if line.startswith("| both")]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs_before
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4


def test_recipe_sweep_rejects_bad_ensembles_and_missing_sweeps(sweep_recipes, tmp_path, capsys):
    # an ensemble naming a variant the sweep lacks fails before anything trains
    assert sweep_recipes.main(["--quick", "--out", str(tmp_path / "a"), "--ensembles", '{"x": ["base", "nope"]}']) == 2
    assert "does not have: nope" in capsys.readouterr().err and not (tmp_path / "a" / "runs").exists()
    assert sweep_recipes.main(["--out", str(tmp_path / "none"), "--summarize"]) == 2
    assert "run the sweep with --out" in capsys.readouterr().err
    assert sweep_recipes.main(["--quick", "--out", str(tmp_path / "b"), "--ensembles", "[1]"]) == 2
    with pytest.raises(SystemExit):
        sweep_recipes.main(["--summarize"])  # --summarize needs --out: a usage error


def test_members_trains_each_variant_per_ensemble_member_and_scores_the_ensembles(sweep_recipes, tmp_path, capsys):
    base = json.dumps({"ensemble": [{}, {"lr": 0.01, "augment": {"hflip": 0.0}}]})
    variants = json.dumps({"ls": {"label_smoothing": 0.2, "augment": {"rotation": 5.0}}})
    assert sweep_recipes.main(["--quick", "--base", base, "--members", "--variants", variants, "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in rows] == [("ls-m0", 0), ("ls-m0", 1), ("ls-m1", 0), ("ls-m1", 1)]
    m0, m1 = (json.loads((tmp_path / "runs" / f"ls-m{k}-s0" / "config.json").read_text()) for k in (0, 1))
    # the variant's overrides on top of each member's, augmentations merged
    assert m0["label_smoothing"] == m1["label_smoothing"] == 0.2 and m0["ensemble"] is None
    assert m0["lr"] == 1e-3 and m1["lr"] == 0.01
    assert m1["augment"]["hflip"] == 0.0 and m1["augment"]["rotation"] == m0["augment"]["rotation"] == 5.0
    assert m0["augment"].get("hflip") != 0.0  # member 0 keeps the preset's flips
    out = capsys.readouterr().out
    line = re.search(r"^\| ls \(ls-m0 \+ ls-m1\) \| test \| .*$", out, flags=re.M)
    assert line, out

    # the same tables from the saved sweep, read back from two folders (as from two processes)
    part = tmp_path / "part2"
    part.mkdir()
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    (part / "results.jsonl").write_text("".join(lines[2:]))
    (tmp_path / "results.jsonl").write_text("".join(lines[:2]))
    with np.load(tmp_path / "probs.npz") as z:
        np.savez(part / "probs.npz", **{k: z[k] for k in z.files if k.startswith("ls-m1/")})
        kept = {k: z[k] for k in z.files if k.startswith("ls-m0/")}
    np.savez(tmp_path / "probs.npz", **kept)
    assert sweep_recipes.main(["--out", str(tmp_path), "--also", str(part), "--summarize", "--members"]) == 0
    assert line.group(0) in capsys.readouterr().out
    # without the second folder the row names the one member it has
    assert sweep_recipes.main(["--out", str(tmp_path), "--summarize", "--members"]) == 0
    assert "| ls (ls-m0) | test |" in capsys.readouterr().out
    # a folder read twice is refused, not counted twice
    assert sweep_recipes.main(["--out", str(tmp_path), "--also", str(tmp_path), "--summarize", "--members"]) == 2
    assert "repeats runs already read: ls-m0 seed 0, ls-m0 seed 1" in capsys.readouterr().err

    # --members without an ensemble is a clear error before anything trains
    assert sweep_recipes.main(["--quick", "--preset", "paper", "--members", "--out", str(tmp_path / "x")]) == 2
    assert "--members needs a preset" in capsys.readouterr().err and not (tmp_path / "x" / "runs").exists()


def test_ensembles_across_variants_average_each_seeds_members(sweep_recipes, tmp_path, capsys):
    """A hand-made sweep where each variant alone scores F1 0.5 at seed 0 and their mean
    probability 0.667: the table must show the ensemble's, seed by seed."""
    y = np.array([0, 0, 1, 1])
    p = {("a", 0): [0.6, 0.1, 0.9, 0.4], ("b", 0): [0.2, 0.55, 0.7, 0.45],  # mean: 0.4 0.325 0.8 0.425 -> F1 2/3
         ("a", 1): [0.1, 0.2, 0.9, 0.8], ("b", 1): [0.3, 0.1, 0.6, 0.1]}    # mean: 0.2 0.15 0.75 0.45 -> F1 2/3
    rows = [{"variant": v, "seed": s, "seconds": 1.0, "epoch": 1, "threshold": 0.5,
             "val": dict.fromkeys(sweep_recipes.KEYS, 0.5)} for v, s in p]  # the per-variant table reads these
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    np.savez(tmp_path / "probs.npz", **{f"{v}/{s}/val/y": y for v, s in p}, **{f"{v}/{s}/val/p": np.array(q) for (v, s), q in p.items()})
    assert sweep_recipes.main(["--out", str(tmp_path), "--summarize", "--ensembles", '{"ab": ["a", "b"], "a": ["a"]}']) == 0
    out = capsys.readouterr().out
    cells = {m.group(1): [c.strip() for c in m.group(2).split("|")]
             for m in re.finditer(r"^\| (ab|a) \([^)]*\) \| val \| (.*) \|$", out, flags=re.M)}
    assert set(cells) == {"ab", "a"}, out
    # accuracy, f1, specificity, auc (mean ± sd), then f1 at seed 0 and seed 1
    assert [float(c) for c in cells["ab"][-2:]] == pytest.approx([2 / 3, 2 / 3], abs=1e-4)
    assert cells["ab"][1] == "0.6667 ± 0.0000" and cells["ab"][0] == "0.7500 ± 0.0000"
    assert [float(c) for c in cells["a"][-2:]] == pytest.approx([0.5, 1.0], abs=1e-4)

    # a cut-short sweep: b never ran at seed 1, so "ab" is scored at seed 0 alone and says so
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if (r["variant"], r["seed"]) != ("b", 1)))
    np.savez(tmp_path / "probs.npz", **{f"{v}/{s}/val/y": y for v, s in p if (v, s) != ("b", 1)},
             **{f"{v}/{s}/val/p": np.array(q) for (v, s), q in p.items() if (v, s) != ("b", 1)})
    assert sweep_recipes.main(["--out", str(tmp_path), "--summarize", "--ensembles", '{"ab": ["a", "b"]}']) == 0
    row = re.search(r"^\| ab \(a \+ b, 1 seeds\) \| val \| (.*) \|$", capsys.readouterr().out, flags=re.M)
    assert row, "the ensemble row says how many seeds it has"
    cells = [c.strip() for c in row.group(1).split("|")]
    assert cells[-1] == "-" and float(cells[-2]) == pytest.approx(2 / 3, abs=1e-4)


def test_errors_lists_the_test_images_the_ensembles_get_wrong_most_often(sweep_recipes, tmp_path, capsys):
    """A hand-made sweep of ensemble "ab" at two seeds: negative 0 is wrong at both, negative 1
    (mean exactly 0.5, called positive) and positive 1 at seed 0 only, the rest never."""
    from conftest import make_train_test

    y = np.array([0, 0, 0, 1, 1, 1])
    p = {("a", 0): [0.9, 0.8, 0.1, 0.9, 0.2, 0.9], ("b", 0): [0.7, 0.2, 0.1, 0.9, 0.4, 0.9],
         ("a", 1): [0.9, 0.1, 0.1, 0.9, 0.9, 0.9], ("b", 1): [0.9, 0.1, 0.1, 0.9, 0.9, 0.9]}
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    rows = [{"variant": v, "seed": s, "seconds": 1.0, "epoch": 1, "threshold": 0.5,
             "test": dict.fromkeys(sweep_recipes.KEYS, 0.5)} for v, s in p]
    (sweep / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    np.savez(sweep / "probs.npz", **{f"{v}/{s}/test/y": y for v, s in p}, **{f"{v}/{s}/test/p": np.array(q) for (v, s), q in p.items()})
    data = make_train_test(tmp_path / "data", 4, 3, size=16)  # test/: IM-0000-0001, IM-0000-0002, IM-0001-0001, person3_...

    argv = ["--out", str(sweep), "--summarize", "--ensembles", '{"ab": ["a", "b"]}', "--errors", "2"]
    assert sweep_recipes.main([*argv, "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "over 2 ensembles" in out
    table = re.findall(r"^\| (negative|positive) \| (\S+) \| ([\d.]+) % \|$", out, flags=re.M)
    assert table == [("negative", "IM-0000-0001.jpeg", "100.0"), ("negative", "IM-0000-0002.jpeg", "50.0"),
                     ("positive", "person3_pneumonia_1.jpeg", "50.0"), ("positive", "person3_pneumonia_0.jpeg", "0.0")], out
    assert "negatives: 1 of 3 images wrong in >= 90 % of the ensembles, 2 in >= 50 %; 1.5 wrong per ensemble" in out
    assert "positives: 0 of 3 images wrong in >= 90 % of the ensembles, 1 in >= 50 %; 0.5 wrong per ensemble" in out

    assert sweep_recipes.main(argv) == 0  # without --data the images are numbered
    assert "| negative | image 0 | 100.0 % |" in capsys.readouterr().out
    small = make_train_test(tmp_path / "small", 4, 2, size=16)
    assert sweep_recipes.main([*argv, "--data", str(small)]) == 2
    assert "test/ has 4 readable images, the sweep scored 6" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        sweep_recipes.main([*argv, "--errors", "-1"])
    assert exc.value.code == 2


def test_rethreshold_scores_each_ensemble_at_its_own_validation_threshold(sweep_recipes, tmp_path, capsys):
    """Validation positives at 0.6 and 0.8: recall=1.0 picks 0.6 and recall=0.5 picks 0.8, so the
    test/ positive at 0.7 is called only under the first rule (test/ F1 1.0 against 2/3)."""
    yv, yt = np.array([0, 1, 1]), np.array([0, 1, 1])
    pv, pt = np.array([0.1, 0.6, 0.8]), np.array([0.1, 0.7, 0.9])
    rows = [{"variant": "a", "seed": 0, "seconds": 1.0, "epoch": 1, "threshold": 0.5,
             "val": dict.fromkeys(sweep_recipes.KEYS, 0.5), "test": dict.fromkeys(sweep_recipes.KEYS, 0.5)}]
    (tmp_path / "results.jsonl").write_text(json.dumps(rows[0]) + "\n")
    np.savez(tmp_path / "probs.npz", **{"a/0/val/y": yv, "a/0/val/p": pv, "a/0/test/y": yt, "a/0/test/p": pt})
    argv = ["--out", str(tmp_path), "--summarize", "--ensembles", '{"e": ["a"]}', "--rethreshold"]
    f1 = {}
    for r in ("recall=0.99", "recall=0.5"):
        assert sweep_recipes.main([*argv, r]) == 0
        out = capsys.readouterr().out
        row = re.search(rf"^\| e \(a, threshold {r} on validation\) \| test \| (.*) \|$", out, flags=re.M)
        assert row, out
        f1[r] = float(row.group(1).split("|")[1].split("±")[0])
    assert f1 == {"recall=0.99": pytest.approx(1.0), "recall=0.5": pytest.approx(2 / 3, abs=1e-4)}
    for bad in ("0.5", "recall=2"):
        with pytest.raises(SystemExit) as exc:
            sweep_recipes.main([*argv, bad])
        assert exc.value.code == 2
    assert "--rethreshold takes a rule" in capsys.readouterr().err
