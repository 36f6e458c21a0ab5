import csv
import json

import pytest
import torch

from conftest import FAST_TRAIN, ctrl_c_in_epoch, make_image_folder, shared_data_or_skip
from deepcovid.checkpoint import load_checkpoint, read_checkpoint
from deepcovid.cli import main
from deepcovid.errors import ConfigError
from deepcovid.training import fit, parse_grid, resolve_config, run_many, write_leaderboard

FAST = FAST_TRAIN


def test_cli_train_writes_a_complete_run_folder(dataset, tmp_path):
    out = tmp_path / "ck"
    rc = main(["train", "--data", str(dataset), "--arch", "efficientnet_lite0", "--epochs", "2", "--input-size", "32",
               "--batch-size", "8", "--val-fraction", "0.25", "--cache", "memory", "--output", str(out),
               "--run-name", "r1", "--lr", "1e-3", "--freeze", "2"])
    assert rc == 0
    run = out / "r1"
    for f in ("best.safetensors", "best.json", "last.safetensors", "last.json", "history.csv", "config.json",
              "curves.png", "roc_val.png", "confusion_val.png", "test_metrics.json", "train.log"):
        assert (run / f).is_file(), f
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for col in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_auc"):
        float(rows[0][col])
    meta = json.loads((run / "best.json").read_text())
    assert meta["data"]["train_counts"] == {"NORMAL": 12, "PNEUMONIA": 12}
    assert 0 < meta["threshold"] < 1 and meta["input_size"] == 32
    # test/ is a report, evaluated once with the stored threshold
    tm = json.loads((run / "test_metrics.json").read_text())
    assert tm["threshold"] == meta["threshold"] and tm["tp"] + tm["tn"] + tm["fp"] + tm["fn"] == 8
    # the best checkpoint is the best validation F1 of the history (ties: lower loss)
    best_f1 = max(float(r["val_f1_at_threshold"]) for r in rows)
    assert meta["val_metrics"]["f1"] == pytest.approx(best_f1, abs=1e-5)
    assert load_checkpoint("best", out).meta["run"] == run.name


def test_interrupted_run_resumes_at_the_next_epoch(dataset, tmp_path, monkeypatch):
    import deepcovid.training as tr

    real = tr.train_one_epoch
    calls = []

    def interrupt_in_epoch_2(*a, **k):
        calls.append(k["epoch"])
        if k["epoch"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "train_one_epoch", interrupt_in_epoch_2)
    cfg = resolve_config({**FAST, "epochs": 3})
    res = fit({**cfg, "run_name": "resumable"}, dataset, tmp_path)
    assert res.interrupted and calls == [1, 2]
    last = read_checkpoint(tmp_path / "resumable" / "last.safetensors")
    assert last.meta["epoch"] == 1 and "optimizer" in last.meta and any(k.startswith("optim.") for k in last.extra)

    # a run saved before an option existed resumes with that option's default
    from deepcovid.checkpoint import save_checkpoint

    old_meta = {**last.meta, "config": {k: v for k, v in last.meta["config"].items() if k not in ("compile", "threshold")}}
    save_checkpoint(tmp_path / "resumable", "last", last.state_dict, old_meta, extra_tensors=last.extra)
    monkeypatch.setattr(tr, "train_one_epoch", real)
    seen = []
    monkeypatch.setattr(tr, "train_one_epoch", lambda *a, **k: (seen.append(k["epoch"]), real(*a, **k))[1])
    res2 = fit({"_epochs_explicit": False}, None, tmp_path, resume=tmp_path / "resumable")
    assert seen == [2, 3] and not res2.interrupted
    rows = list(csv.DictReader((tmp_path / "resumable" / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_a_resumed_run_trains_what_an_uninterrupted_run_trains(dataset, tmp_path, monkeypatch):
    import deepcovid.training as tr

    cfg = resolve_config({**FAST, "epochs": 3})
    fit({**cfg, "run_name": "straight"}, dataset, tmp_path)
    real = tr.train_one_epoch
    monkeypatch.setattr(tr, "train_one_epoch", ctrl_c_in_epoch(real, 2))
    assert fit({**cfg, "run_name": "halted"}, dataset, tmp_path).interrupted
    saved = read_checkpoint(tmp_path / "halted" / "last.safetensors")
    assert saved.extra[tr.ORDER_RNG_KEY].dtype == torch.uint8  # the batch order's generator, after epoch 1
    # a resume point whose state is not a generator's is refused with a typed error, untouched
    import shutil

    from deepcovid.checkpoint import save_checkpoint
    from deepcovid.errors import CheckpointError

    shutil.copytree(tmp_path / "halted", tmp_path / "broken")
    save_checkpoint(tmp_path / "broken", "last", saved.state_dict, saved.meta,
                    extra_tensors={**saved.extra, tr.ORDER_RNG_KEY: torch.zeros(3, dtype=torch.uint8)})
    before = (tmp_path / "broken" / "last.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="batch-order state"):
        fit({"_epochs_explicit": False}, None, tmp_path, resume=tmp_path / "broken")
    assert (tmp_path / "broken" / "last.safetensors").read_bytes() == before
    monkeypatch.setattr(tr, "train_one_epoch", real)
    fit({"_epochs_explicit": False}, None, tmp_path, resume=tmp_path / "halted")

    def losses(run):
        return [float(r["train_loss"]) for r in csv.DictReader((tmp_path / run / "history.csv").open())]

    # epochs 2 and 3 see the same batches in the same order: same losses, same final weights
    assert losses("halted") == losses("straight") and len(losses("straight")) == 3
    a = read_checkpoint(tmp_path / "straight" / "last.safetensors").state_dict
    b = read_checkpoint(tmp_path / "halted" / "last.safetensors").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_last_is_written_at_most_every_LAST_EVERY_S_and_never_lost_on_ctrl_c(dataset, tmp_path, monkeypatch):
    import deepcovid.checkpoint as ck
    import deepcovid.training as tr

    monkeypatch.setattr(tr, "LAST_EVERY_S", 1e9)
    writes = []
    real_save = ck.save_checkpoint
    monkeypatch.setattr(tr, "save_checkpoint", lambda d, name, sd, meta, **k: (writes.append((name, meta["epoch"])),
                                                                              real_save(d, name, sd, meta, **k))[1])
    real = tr.train_one_epoch
    monkeypatch.setattr(tr, "train_one_epoch", ctrl_c_in_epoch(real, 4))
    res = fit({**resolve_config({**FAST, "epochs": 5}), "run_name": "throttled"}, dataset, tmp_path)
    assert res.interrupted
    # the first epoch is written at once, epochs 2-3 are held in memory and written on Ctrl-C
    assert [e for n, e in writes if n == "last"] == [1, 3]
    last = read_checkpoint(tmp_path / "throttled" / "last.safetensors")
    assert last.meta["epoch"] == 3 and [r["epoch"] for r in last.meta["history"]] == [1, 2, 3]

    monkeypatch.setattr(tr, "train_one_epoch", real)
    writes.clear()
    res2 = fit({"_epochs_explicit": False}, None, tmp_path, resume=tmp_path / "throttled")
    assert not res2.interrupted and [e for n, e in writes if n == "last"] == [4, 5]
    assert read_checkpoint(tmp_path / "throttled" / "last.safetensors").meta["epoch"] == 5


def test_cosine_schedule_is_a_function_of_the_epoch(dataset, tmp_path):
    from deepcovid.training import lr_at

    cfg = resolve_config({**FAST, "epochs": 4, "lr": 1e-3, "schedule": "cosine"})
    assert [round(lr_at(cfg, e), 8) for e in (1, 2, 3, 4)] == [1e-3, 0.00085355, 0.0005, 0.00014645]
    assert lr_at({**cfg, "schedule": "constant"}, 3) == 1e-3
    fit({**cfg, "run_name": "cos"}, dataset, tmp_path)
    rows = list(csv.DictReader((tmp_path / "cos" / "history.csv").open()))
    assert [float(r["lr"]) for r in rows] == pytest.approx([lr_at(cfg, e) for e in (1, 2, 3, 4)], rel=1e-4)
    with pytest.raises(ConfigError, match="unknown --schedule"):
        resolve_config({"schedule": "step"})


def test_cosine_step_schedule_decays_within_each_epoch(dataset, tmp_path, monkeypatch):
    from deepcovid.training import lr_at

    cfg = resolve_config({**FAST, "epochs": 2, "lr": 1e-3, "schedule": "cosine-step"})
    # 2 epochs of 4 steps: the curve of "cosine" over 8 steps, so epoch 2 starts at the midpoint
    assert [round(lr_at(cfg, 1, i, 4), 8) for i in range(4)] == [1e-3, 0.00096194, 0.00085355, 0.00069134]
    assert lr_at(cfg, 2, 0, 4) == pytest.approx(5e-4) and lr_at(cfg, 2, 4, 4) == pytest.approx(0.0)
    assert lr_at({**cfg, "schedule": "cosine"}, 1, 3, 4) == 1e-3  # per epoch: the step is ignored

    used = []  # the learning rate each optimizer step actually ran with
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    fit({**cfg, "run_name": "cosstep"}, dataset, tmp_path)
    steps = len(used) // 2
    assert steps >= 2 and len(used) == 2 * steps
    expected = [lr_at(cfg, e, i, steps) for e in (1, 2) for i in range(steps)]
    assert used == pytest.approx(expected, rel=1e-9)
    assert used[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(used, used[1:]))


def test_bf16_precision_runs_training_in_bfloat16_and_keeps_float32_weights(dataset, tmp_path, monkeypatch):
    from deepcovid.training import autocast_for

    cpu = torch.device("cpu")
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        amp, scaler = autocast_for(cpu, precision)
        with amp():
            assert conv(x).dtype == dtype and scaler is False
    with pytest.raises(ConfigError, match="unknown --precision"):
        autocast_for(cpu, "fp16x")

    seen = {}  # dtype of every convolution output while fitting, by whether autograd was recording
    real_forward = torch.nn.Conv2d.forward

    def spy(self, inp):
        out = real_forward(self, inp)
        seen.setdefault(torch.is_grad_enabled(), set()).add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    for precision in ("fp32", "bf16"):
        seen.clear()
        cfg = resolve_config({**FAST, "epochs": 1, "precision": precision})
        fit({**cfg, "run_name": precision}, dataset, tmp_path)
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert seen[True] == {want}  # the training steps
        ckpt = read_checkpoint(tmp_path / precision / "best.safetensors")
        assert ckpt.meta["config"]["precision"] == precision
        assert all(v.dtype == torch.float32 for v in ckpt.state_dict.values() if v.is_floating_point())
        assert all(0 <= v <= 1 for k, v in json.loads((tmp_path / precision / "test_metrics.json").read_text()).items()
                   if k in ("accuracy", "auc"))


def test_recall_threshold_rule_keeps_the_validation_sensitivity(dataset, tmp_path):
    import numpy as np

    from deepcovid.metrics import recall_threshold

    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.35, 0.7, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.8, 0.85, 0.9, 0.95])
    # ten positives: recall >= 0.9 needs 9 of them called, so the 9th highest, 0.3, is the threshold
    assert recall_threshold(y, p, 0.9) == 0.3
    assert recall_threshold(y, p, 0.95) == 0.2 and recall_threshold(y, p, 0.5) == 0.65
    assert ((p >= recall_threshold(y, p, 0.8))[y == 1]).mean() >= 0.8
    assert recall_threshold(np.ones(3), p[:3], 0.9) == 0.5  # undefined with one class

    cfg = resolve_config({**FAST, "threshold": "recall=0.9"})
    res = fit({**cfg, "run_name": "rec"}, dataset, tmp_path)
    meta = load_checkpoint(tmp_path / "rec").meta
    val = meta["val_metrics"]
    assert val["recall"] >= 0.9 and meta["config"]["threshold"] == "recall=0.9"
    rows = list(csv.DictReader((tmp_path / "rec" / "history.csv").open()))
    assert float(rows[int(meta["epoch"]) - 1]["val_threshold"]) == pytest.approx(meta["threshold"])
    assert json.loads((res.run_dir / "test_metrics.json").read_text())["threshold"] == pytest.approx(meta["threshold"])
    for bad in ("recall=1", "recall=0", "recall=x", "recall="):
        with pytest.raises(ConfigError, match="recall=R"):
            resolve_config({**FAST, "threshold": bad})


def test_fixed_threshold_is_stored_and_used_for_selection(dataset, tmp_path):
    cfg = resolve_config({**FAST, "threshold": "0.5"})
    res = fit({**cfg, "run_name": "fixed"}, dataset, tmp_path)
    meta = load_checkpoint(tmp_path / "fixed").meta
    assert meta["threshold"] == 0.5 and meta["config"]["threshold"] == "0.5"
    rows = list(csv.DictReader((tmp_path / "fixed" / "history.csv").open()))
    assert {float(r["val_threshold"]) for r in rows} == {0.5}
    assert json.loads((res.run_dir / "test_metrics.json").read_text())["threshold"] == 0.5
    for bad in ("1.5", "0", "best", "nan"):
        with pytest.raises(ConfigError, match="--threshold"):
            resolve_config({**FAST, "threshold": bad})


def test_head_epochs_train_the_head_before_the_whole_model(dataset, tmp_path):
    """LP-FT: with lr 0 for the fine-tuning phase, only the linear probe can change the weights."""
    heads, backbones = [], []
    for n in (0, 2):
        cfg = resolve_config({**FAST, "epochs": 1, "lr": 0.0, "head_epochs": n})
        fit({**cfg, "run_name": f"lp{n}"}, dataset, tmp_path)
        sd = read_checkpoint(tmp_path / f"lp{n}" / "best.safetensors").state_dict
        heads.append({k: v for k, v in sd.items() if k.startswith("head.")})
        backbones.append({k: v for k, v in sd.items() if k.startswith("backbone.") and v.is_floating_point()})
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    assert all(torch.equal(backbones[0][k], backbones[1][k]) for k in backbones[0] if "running" not in k)
    with pytest.raises(ConfigError, match="--head-epochs"):
        resolve_config({**FAST, "head_epochs": -1})


def test_grid_picks_the_better_trial(dataset, tmp_path):
    trials = parse_grid("lr=0,3e-3")
    assert trials == [{"lr": 0.0}, {"lr": 3e-3}]
    cfg = resolve_config({**FAST, "epochs": 3, "freeze": "backbone"})
    results = run_many({**cfg, "run_name": "g"}, dataset, tmp_path, [{**t, "arch": "efficientnet_lite0"} for t in trials])
    rows = write_leaderboard(tmp_path, results)
    assert len(rows) == 2 and (tmp_path / "leaderboard.csv").is_file() and (tmp_path / "leaderboard.md").is_file()
    f1 = {r["lr"]: r["f1"] for r in rows}
    assert rows[0]["f1"] >= rows[1]["f1"]
    # a learning rate of 0 cannot learn; the trained trial wins
    assert rows[0]["lr"] == 3e-3 and f1[3e-3] > f1[0.0]


@pytest.mark.parametrize("argv,message", [
    (["--optimizer", "rmsprop"], "unknown --optimizer"),
    (["--arch", "vgg"], "unknown arch"),
    (["--freeze", "half"], "--freeze"),
    (["--device", "tpu"], "unknown --device"),
    (["--epochs", "0"], "positive integer"),
    (["--augment", "sharpen=1"], "unknown augmentation"),
    (["--grid", "lr"], "KEY=V1,V2"),
    (["--preset", "magic"], "unknown --preset"),
    (["--clahe", "-1"], "CLAHE clip limit"),
    (["--clahe", "nan"], "CLAHE clip limit"),
    (["--mixup", "-1"], "--mixup must be"),
    (["--mixup", "nan"], "--mixup must be"),
    (["--augment", "erase=2"], "erase is a probability in [0, 1]"),
    (["--augment", "erase=nan"], "erase is a probability in [0, 1]"),
    (["--augment", "neg_blur_p=2"], "neg_blur_p is a probability in [0, 1]"),
    (["--augment", "neg_blur=-1"], "neg_blur is a maximum sigma"),
    (["--augment", "neg_zoom_p=2"], "neg_zoom_p is a probability in [0, 1]"),
    (["--precision", "fp8"], "unknown --precision"),
])
def test_bad_flags_give_clear_errors(dataset, tmp_path, capsys, argv, message):
    rc = main(["train", "--data", str(dataset), "--output", str(tmp_path), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_data_stops_before_training(tmp_path, capsys):
    (tmp_path / "d" / "train" / "NORMAL").mkdir(parents=True)
    make_image_folder(tmp_path / "d" / "train", {"PNEUMONIA": 4}, size=16)
    rc = main(["train", "--data", str(tmp_path / "d"), "--arch", "efficientnet_lite0", "--output", str(tmp_path / "o")])
    assert rc == 2 and "hold no images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_cli_writes_every_key(dataset, tmp_path, capsys):
    cfg = resolve_config({**FAST, "epochs": 1})
    fit({**cfg, "run_name": "ev"}, dataset, tmp_path / "ck")
    out = tmp_path / "eval" / "m.json"
    rc = main(["evaluate", "--checkpoint", "best", "--checkpoints-dir", str(tmp_path / "ck"),
               "--data", str(dataset / "test"), "--json", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    for k in ("tp", "tn", "fp", "fn", "accuracy", "precision", "recall", "specificity", "f1", "auc", "threshold"):
        assert k in m
    assert m["tp"] + m["tn"] + m["fp"] + m["fn"] == 8 and m["at_0.5"]["threshold"] == 0.5
    for row in (m, m["at_0.5"]):  # 95 % intervals over the images, around each score
        for k in ("accuracy", "precision", "recall", "specificity", "f1", "auc"):
            assert row["ci95"][k][0] <= row[k] <= row["ci95"][k][1]
    assert (out.parent / "roc_eval.png").is_file()
    printed = capsys.readouterr().out
    assert "stored threshold" in printed and "95 % intervals" in printed


def test_resolve_config_precedence():
    from deepcovid.training import PRESETS

    PRESETS["_t"] = {"lr": 5e-4, "epochs": 7}
    try:
        cfg = resolve_config({"epochs": 3}, "_t")
        assert cfg["lr"] == 5e-4 and cfg["epochs"] == 3 and cfg["batch_size"] == 16
    finally:
        del PRESETS["_t"]
    with pytest.raises(ConfigError):
        resolve_config({"lr": -1})


@pytest.mark.realdata
@pytest.mark.slow
def test_short_real_run_writes_a_loadable_best_checkpoint(tmp_path):
    root = shared_data_or_skip()
    cfg = resolve_config({"arch": "efficientnet_lite0", "weights": "imagenet", "epochs": 1, "input_size": 64,
                          "batch_size": 16, "cache": "disk", "cache_dir": str(tmp_path / "cache")})
    from deepcovid.data import load_splits

    splits = load_splits(root, val_fraction=0.1, seed=0)
    assert {s.patient for s in splits.train}.isdisjoint({s.patient for s in splits.val})
    # Keep the test short (decoding all 5,216 images alone takes minutes on 2 cores): every
    # 16th training image and every 4th validation image; the full run reports test/.
    splits.test = None
    splits.train, splits.val = splits.train[::16], splits.val[::4]
    res = fit({**cfg, "run_name": "real"}, root, tmp_path, splits=splits)
    ck = load_checkpoint(res.run_dir)
    model = ck.build_model()
    assert sum(ck.meta["data"]["train_counts"].values()) == len(splits.train)
    assert ck.meta["data"]["val_counts"]["NORMAL"] > 0 and ck.meta["data"]["val_counts"]["PNEUMONIA"] > 0
    assert model.num_outputs == 1 and 0 <= ck.meta["val_metrics"]["f1"] <= 1


@pytest.mark.parametrize("freeze", ["backbone", "2"])
def test_cached_frozen_layers_reproduce_the_uncached_run(dataset, tmp_path, freeze):
    """Head-only (pooled features) and last-N-blocks (boundary activations) caches train the
    same model as running the frozen layers every epoch, on a seeded run."""
    from deepcovid.data import load_splits

    splits = load_splits(dataset, val_fraction=0.25, seed=0)
    splits.test = None
    cfg = resolve_config({**FAST, "epochs": 2, "freeze": freeze, "no_augment": True})
    res = {}
    for cached in (True, False):
        r = fit({**cfg, "feature_cache": cached, "run_name": f"{freeze}-{cached}"}, dataset, tmp_path, splits=splits)
        res[cached] = r.val_metrics
        rows = list(csv.DictReader((r.run_dir / "history.csv").open()))
        res[(cached, "loss")] = [float(x["train_loss"]) for x in rows]
    tol = 1e-5 if freeze == "backbone" else 5e-3  # boundary activations are cached in float16
    assert res[True]["loss"] == pytest.approx(res[False]["loss"], abs=tol)
    assert res[(True, "loss")] == pytest.approx(res[(False, "loss")], abs=tol)


@pytest.mark.parametrize("freeze,extra", [("backbone", {"tta": "hflip"}), ("backbone", {"ema": 0.9}),
                                          ("2", {"mixup": 0.2}), ("backbone", {"feature_cache": False})])
def test_an_uncached_frozen_run_serves_its_frozen_layers_and_trains_the_same_model(dataset, tmp_path, freeze, extra, caplog):
    """A frozen run that cannot cache (--tta, --ema, --mixup, --no-feature-cache) runs a served copy
    of its frozen layers every epoch: the same losses and saved weights as running them as trained,
    the frozen weights untouched, and --ema still averages (and saves) the whole model."""
    import deepcovid.training as tr
    from deepcovid.data import load_splits

    splits = load_splits(dataset, val_fraction=0.25, seed=0)
    splits.test = None
    cfg = resolve_config({**FAST, "epochs": 2, "freeze": freeze, "no_augment": "mixup" not in extra, **extra})
    runs = {}
    for served in (True, False):
        with caplog.at_level("INFO", logger="deepcovid"), pytest.MonkeyPatch.context() as mp:
            if not served:
                mp.setattr(tr, "serves_frozen_every_epoch", lambda cfg, cached: False)
            caplog.clear()
            r = fit({**cfg, "feature_cache": False, "run_name": f"served-{served}"}, dataset, tmp_path, splits=splits)
        assert ("frozen layers served for every epoch" in caplog.text) == served
        rows = list(csv.DictReader((r.run_dir / "history.csv").open()))
        runs[served] = ([float(x["train_loss"]) for x in rows], [float(x["val_loss"]) for x in rows],
                        read_checkpoint(r.run_dir / "best.safetensors"), read_checkpoint(r.run_dir / "last.safetensors"))
    (tl, vl, best, last), (tl0, vl0, best0, last0) = runs[True], runs[False]
    # Folded BatchNorms round differently; with trained blocks after them (BatchNorm in training
    # mode), two epochs amplify that to about 1e-4 (4e-4 with MixUp) in the loss.
    tol = 1e-5 if freeze == "backbone" else 1e-3
    assert tl == pytest.approx(tl0, abs=tol) and vl == pytest.approx(vl0, abs=tol)
    assert best.state_dict.keys() == best0.state_dict.keys()
    if freeze == "backbone":
        for k, v in best.state_dict.items():
            assert torch.allclose(v.float(), best0.state_dict[k].float(), atol=1e-4), k
    # the frozen layers are the pretrained ones, the trained ones moved
    from deepcovid.models import build_model

    init = build_model("efficientnet_lite0", 2, weights="imagenet", freeze=freeze).state_dict()
    frozen = [k for k in init if k.startswith("backbone.conv_stem") or k.startswith("backbone.blocks.0.")]
    assert frozen and all(torch.equal(last.state_dict[k], init[k]) for k in frozen)
    assert not torch.equal(last.state_dict["head.1.weight"], init["head.1.weight"])
    if "ema" in extra:
        assert last.meta["ema_updates"] == 6 and any(
            not torch.equal(v, last.state_dict[k]) for k, v in best.state_dict.items() if k.startswith("head."))


@pytest.mark.parametrize("freeze", ["backbone", 2])
def test_feature_cache_serves_a_copy_of_the_frozen_layers(freeze):
    """The one pass over the frozen layers runs a served copy (BatchNorm folded, weights packed and
    ReLUs fused on a CPU in float32): the same outputs, and the model itself untouched."""
    from contextlib import nullcontext

    from torch import nn

    from deepcovid.models import build_model
    from deepcovid.prepack import PackedConv2d, available
    from deepcovid.training import serve_frozen

    torch.manual_seed(0)
    m = build_model("efficientnet_lite0", 2, weights="none", freeze=freeze).eval()
    prefix, _ = m.split_frozen(freeze)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    served = serve_frozen(prefix, x[:1], nullcontext)
    assert served is not prefix
    with torch.inference_mode():
        want, got = prefix(x), served(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    bns = lambda mod: [b for b in mod.modules() if isinstance(b, nn.BatchNorm2d)]  # noqa: E731
    assert bns(prefix) and not bns(served)  # every BatchNorm folded in the copy, none in the model
    assert not any(isinstance(c, PackedConv2d) for c in m.modules())
    assert any(isinstance(c, PackedConv2d) for c in served.modules()) == available()
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # under autocast the packed weights would not serve: nothing is packed, BatchNorm still folds
    bf16 = serve_frozen(prefix, x[:1], lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert not bns(bf16) and not any(isinstance(c, PackedConv2d) for c in bf16.modules())


def test_split_frozen_is_exact():
    import torch

    from deepcovid.models import build_model

    for arch, freeze in (("efficientnet_lite0", 3), ("resnet50", 1), ("efficientnet_lite0", "backbone")):
        m = build_model(arch, 2, freeze=freeze).eval()
        prefix, rest = m.split_frozen(freeze)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(m(x), rest(prefix(x)), atol=1e-6)
        assert not any(p.requires_grad for p in prefix.parameters())
        assert sum(p.numel() for p in rest.parameters() if p.requires_grad) == sum(
            p.numel() for p in m.parameters() if p.requires_grad)
    assert build_model("inception_v3", 2, freeze=2).split_frozen(2) is None


def test_loss_is_read_every_sync_every_batches_and_a_nan_still_stops_the_epoch():
    import math

    from deepcovid.training import train_one_epoch

    torch.manual_seed(0)
    x, y = torch.randn(24, 6), torch.randint(0, 2, (24,))
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 24, 4)]

    def run(sync_every, nan_at=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 1)
        reads = []

        class Crit(torch.nn.Module):
            calls = 0

            def forward(self, logits, target):
                Crit.calls += 1
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.view(-1), target.float())
                return loss * float("nan") if Crit.calls == nan_at else loss

        opt = torch.optim.SGD(model.parameters(), 0.1)
        real_item = torch.Tensor.item

        def counting_item(t):
            reads.append(1)
            return real_item(t)

        torch.Tensor.item = counting_item
        try:
            loss, labels, probs = train_one_epoch(model, loader, Crit(), opt, torch.device("cpu"), epoch=1,
                                                  sync_every=sync_every)
        finally:
            torch.Tensor.item = real_item
        return loss, labels, probs, len(reads)

    l1, y1, p1, reads1 = run(1)
    l3, y3, p3, reads3 = run(3)
    # same training, fewer host reads: one per 3 batches plus the epoch's end (6 batches: 2 + 1 + 1)
    assert l1 == pytest.approx(l3) and (y1 == y3).all() and p1 == pytest.approx(p3) and math.isfinite(l1)
    assert reads1 == 6 + 2 and reads3 == 2 + 2
    with pytest.raises(FloatingPointError, match="loss became nan at epoch 1"):
        run(3, nan_at=2)


def test_compile_flag_and_worker_defaults():
    import argparse

    from deepcovid.training import add_arguments, config_from_args, default_workers

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert config_from_args(p.parse_args(["--compile"]))["compile"] is True
    assert config_from_args(p.parse_args([]))["compile"] is False
    assert default_workers(torch.device("cpu")) == 0
    assert default_workers(torch.device("cuda")) >= 1


def test_augment_on_device_trains_from_batches_kept_on_the_device(dataset, tmp_path, caplog):
    """--augment-on device (the CUDA default) runs on any device: the epochs train from
    ``DeviceBatches`` that augment each batch with its labels (``neg_blur`` here too), and the
    choice is logged and stored."""
    import logging

    from deepcovid import training

    seen = []
    real = training.train_one_epoch

    def spy(model, loader, *a, **kw):
        seen.append(loader)
        return real(model, loader, *a, **kw)

    cfg = {**FAST, "augment_on": "device", "augment": {"neg_blur": 2.0, "neg_blur_p": 0.5, "neg_zoom": 0.2, "neg_zoom_p": 0.5}}
    with caplog.at_level(logging.INFO, logger="deepcovid"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "train_one_epoch", spy)
        res = fit({**resolve_config(cfg), "run_name": "dev"}, dataset, tmp_path)
    assert [type(loader).__name__ for loader in seen] == ["DeviceBatches", "DeviceBatches"]
    assert "augmented on the device" in caplog.text
    meta = json.loads((res.run_dir / "best.json").read_text())
    assert meta["config"]["augment_on"] == "device" and (res.run_dir / "best.safetensors").is_file()
    assert meta["config"]["augment"]["neg_blur"] == 2.0 and meta["config"]["augment"]["neg_blur_p"] == 0.5
    # the loader's batches come augmented, as [0, 1] floats: the same uint8 batch differently twice
    x = torch.full((4, 3, 32, 32), 100, dtype=torch.uint8)
    x[:, :, 8:24, 8:24] = 200
    augment, y = seen[0].augment, torch.tensor([0, 1, 0, 1])
    assert augment(x, y).shape == (4, 3, 32, 32) and not torch.equal(augment(x, y), augment(x, y))
    xb, _ = next(iter(seen[0]))
    assert xb.dtype == torch.float32 and 0 <= float(xb.min()) and float(xb.max()) <= 1


def test_augment_on_choices_are_checked(dataset, tmp_path, capsys):
    assert main(["train", "--data", str(dataset), "--output", str(tmp_path), "--augment-on", "gpu"]) == 2
    assert "unknown --augment-on 'gpu'" in capsys.readouterr().err
    rc = main(["train", "--data", str(dataset), "--output", str(tmp_path), "--augment-on", "device", "--cache", "off"])
    assert rc == 2 and "--cache disk or memory" in capsys.readouterr().err
    from deepcovid.training import augment_on

    assert augment_on({"augment_on": "auto", "cache": "disk"}, torch.device("cpu"), None) == "loader"
    # a run on cached frozen features never iterates image batches: nothing goes to the device
    assert augment_on({"augment_on": "device", "cache": "disk"}, torch.device("cpu"), None, feature_cached=True) == "loader"


def test_clahe_is_trained_on_stored_and_applied_by_inference(dataset, tmp_path):
    import numpy as np

    from deepcovid.data import DecodedImages, discover
    from deepcovid.inference import Predictor
    from deepcovid.transforms import normalize

    assert resolve_config({}, "cpu-fast")["clahe"] == 0.0 and resolve_config({"clahe": 2})["clahe"] == 2
    cfg = resolve_config({**FAST, "epochs": 1, "clahe": 3.0, "cache_dir": str(tmp_path / "cache")})
    fit({**cfg, "run_name": "eq"}, dataset, tmp_path)
    ckpt = load_checkpoint(tmp_path / "eq")
    assert ckpt.meta["clahe"] == 3.0
    # the decoded cache holds the equalised images, under their own key beside the plain ones
    _, samples = discover(dataset / "train")
    size = int(ckpt.meta["input_size"])
    eq = DecodedImages(samples, size, "disk", tmp_path / "cache", clahe=3.0)
    plain = DecodedImages(samples, size, "disk", tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("decoded-*clahe3.npy"))) == 1
    assert not np.array_equal(eq.get(0), plain.get(0))
    # inference equalises the same uint8 pixels (these images need no resampling at load)
    pred = Predictor(ckpt.build_model(), ckpt.meta)
    x = pred.prepare(samples[0].path).tensor
    want = normalize(torch.from_numpy(np.ascontiguousarray(eq.get(0))).permute(2, 0, 1), pred.mean, pred.std)[None]
    assert torch.allclose(x, want, atol=1e-6)
    assert not torch.allclose(Predictor(ckpt.build_model(), {**ckpt.meta, "clahe": 0.0}).prepare(samples[0].path).tensor,
                              want, atol=1e-2)
    with pytest.raises(ConfigError, match="CLAHE"):
        Predictor(ckpt.build_model(), {**ckpt.meta, "clahe": "lots"})


def test_mixup_mixes_pairs_of_images_and_their_labels():
    from deepcovid.training import BatchMixUp

    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    xm, t = BatchMixUp(0.4, 2)(x.clone(), y)
    lam = float(t[1])  # image 1 (label 1) mixed with its neighbour, image 0 (label 0)
    assert 0.0 < lam < 1.0 and t.shape == (6,)
    assert torch.allclose(t, lam * y + (1 - lam) * y.roll(1).float())
    assert torch.allclose(xm, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)
    assert xm.is_contiguous(memory_format=torch.channels_last)
    _, t3 = BatchMixUp(0.4, 3)(x.clone(), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert t3.shape == (6, 3) and torch.allclose(t3.sum(1), torch.ones(6))


def test_mixup_run_trains_on_soft_labels_and_refuses_cached_features(dataset, tmp_path, monkeypatch):
    from deepcovid import training

    calls = []
    original = training.BatchMixUp.__call__

    def spy(self, x, y):
        x, t = original(self, x, y)
        calls.append(t.clone())
        return x, t

    monkeypatch.setattr(training.BatchMixUp, "__call__", spy)
    cfg = resolve_config({**FAST, "epochs": 1, "lr": 1e-2})
    fit({**cfg, "run_name": "plain"}, dataset, tmp_path)
    assert calls == []
    fit({**cfg, "mixup": 0.4, "run_name": "mix"}, dataset, tmp_path)
    assert calls and all(((t > 0) & (t < 1)).any() for t in calls)  # soft labels reached the loss
    assert json.loads((tmp_path / "mix" / "config.json").read_text())["mixup"] == 0.4
    assert load_checkpoint(tmp_path / "mix").meta["config"]["mixup"] == 0.4
    a, b = (read_checkpoint(tmp_path / n / "best.safetensors").state_dict for n in ("plain", "mix"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("head."))

    frozen = resolve_config({**FAST, "freeze": "backbone", "mixup": 0.4})
    with pytest.raises(ConfigError, match="--no-feature-cache"):
        fit({**frozen, "run_name": "frozen"}, dataset, tmp_path)
    assert not (tmp_path / "frozen").exists()


# A subprocess with a time limit, so that a hang fails the test instead of the suite. Each
# image a loader worker serves records that process's OpenCV thread count in a file.
CLAHE_WORKERS = """
import json, os, sys
from pathlib import Path
import cv2, numpy as np
from deepcovid.data import XRayDataset
from deepcovid.training import fit, resolve_config, validate_config
root = Path(sys.argv[1])
cv2.setNumThreads(4)
cv2.resize(np.random.rand(2000, 2000).astype(np.float32), (1000, 1000))  # as a large X-ray's decode does
getitem = XRayDataset.__getitem__

def recording(self, i):
    with open(root / f"threads-{os.getpid()}", "a") as f:
        f.write(f"{cv2.getNumThreads()}\\n")
    return getitem(self, i)

XRayDataset.__getitem__ = recording
cfg = resolve_config(json.loads(sys.argv[2]))
validate_config(cfg)
best = fit(cfg, root / "data", root / "out").best_epoch
workers = {int(f.name.split("-")[1]): sorted(set(f.read_text().split())) for f in root.glob("threads-*")}
print(json.dumps({"best": best, "parent": os.getpid(), "workers": workers, "parent_threads": cv2.getNumThreads()}))
"""


def test_clahe_with_loader_workers_trains_and_each_worker_has_one_opencv_thread(tmp_path):
    # Loader workers are forked after the decoded cache has run OpenCV's thread pool (CLAHE
    # here). A worker that then set its own OpenCV thread count waited forever: every CLAHE
    # run on a GPU machine hung so. Now the run finishes, every image is served by a worker
    # with one OpenCV thread, and the training process keeps its own four.
    import subprocess
    import sys

    make_image_folder(tmp_path / "data" / "train", {"NORMAL": 8, "PNEUMONIA": 8}, size=64)
    cfg = {**FAST, "epochs": 1, "clahe": 2.0, "workers": 2, "device": "cpu"}
    out = subprocess.run([sys.executable, "-c", CLAHE_WORKERS, str(tmp_path), json.dumps(cfg)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["best"] == 1 and got["parent_threads"] == 4
    assert len(got["workers"]) == 2 and str(got["parent"]) not in got["workers"]  # served by the two workers only
    assert all(counts == ["1"] for counts in got["workers"].values()), got["workers"]
    runs = list((tmp_path / "out").glob("*/best.safetensors"))
    assert len(runs) == 1 and read_checkpoint(runs[0]).meta["clahe"] == 2.0


@pytest.mark.parametrize("tta", [None, "hflip"])
def test_evaluation_serves_the_checkpoint_and_gives_its_probabilities(tmp_path, image_folder, tta):
    """``predict_samples`` (evaluate, the test/ report) runs the checkpoint served as the Predictor
    serves it (BatchNorm folded, weights packed on a CPU): the probabilities of the checkpoint's own
    modules, to float rounding."""
    from torch.utils.data import DataLoader

    import deepcovid.serving as serving
    from conftest import make_checkpoint
    from deepcovid.data import DecodedImages, XRayDataset, discover
    from deepcovid.prepack import available
    from deepcovid.training import predict_samples

    ck = read_checkpoint(make_checkpoint(tmp_path / "run", tta=tta))
    _, samples = discover(image_folder, ck.meta["classes"])
    reports = []
    real = serving.serve

    def recording(*a, **k):
        model, report = real(*a, **k)
        reports.append(report)
        return model, report

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serving, "serve", recording)
        y, p, bad = predict_samples(ck, samples)
    assert len(reports) == 1 and reports[0].fold.pairs and bool(reports[0].prepacked) == available()
    ds = XRayDataset(DecodedImages(samples, ck.meta["input_size"], "memory", None), ck.meta["mean"], ck.meta["std"],
                     ck.meta["color_space"])
    model = ck.build_model().eval()
    with torch.inference_mode():
        want = torch.cat([torch.sigmoid(model(x)).flatten() for x, _ in DataLoader(ds, batch_size=5)]).numpy()
    assert not bad and len(p) == len(samples) == 12 and sorted(set(y.tolist())) == [0, 1]
    assert p.ravel() == pytest.approx(want, abs=1e-5)
