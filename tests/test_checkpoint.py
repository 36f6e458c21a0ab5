import json
import pickle

import pytest
import torch

from conftest import make_checkpoint
from deepcovid.checkpoint import (FORMAT_VERSION, list_checkpoints, load_checkpoint, read_checkpoint,
                                  resolve_checkpoint, save_checkpoint)
from deepcovid.errors import CheckpointError


def test_round_trip_gives_identical_outputs(tmp_path):
    path = make_checkpoint(tmp_path / "run")
    ck = read_checkpoint(path)
    model = ck.build_model()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    from deepcovid.models import build_model

    torch.manual_seed(0)
    original = build_model("efficientnet_lite0", 2, weights="none").eval()
    with torch.inference_mode():
        assert torch.equal(model(x), original(x))
    meta = json.loads((tmp_path / "run" / "best.json").read_text())
    for key in ("format_version", "arch", "classes", "positive_class", "input_size", "mean", "std", "color_space",
                "threshold", "val_metrics", "epoch", "config", "versions", "data"):
        assert key in meta, key
    assert set(meta["val_metrics"]) >= {"tp", "tn", "fp", "fn", "accuracy", "precision", "recall", "specificity", "f1", "auc"}
    assert meta["versions"]["torch"] == torch.__version__


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/deepcovid-pwned-by-pickle",))


def test_pickle_payload_is_refused_and_not_executed(tmp_path):
    import os

    marker = "/tmp/deepcovid-pwned-by-pickle"
    if os.path.exists(marker):
        os.remove(marker)
    bad = tmp_path / "run" / "best.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(CheckpointError, match="pickle|not a valid safetensors"):
        load_checkpoint(bad)
    torch.save({"x": Evil()}, tmp_path / "run" / "torchsave.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "run" / "torchsave.safetensors")
    assert not os.path.exists(marker)


def test_tampered_truncated_and_newer_checkpoints_are_refused(tmp_path):
    path = make_checkpoint(tmp_path / "run")
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF  # flip a weight byte
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)

    path = make_checkpoint(tmp_path / "run2")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)

    from deepcovid.models import build_model

    meta = json.loads((tmp_path / "run" / "best.json").read_text())
    with pytest.raises(CheckpointError, match="format"):
        p = save_checkpoint(tmp_path / "run3", "best", build_model("efficientnet_lite0", 2).state_dict(), meta)
        # rewrite with a future format by patching the saved header metadata
        from safetensors.torch import load_file, save_file

        t = load_file(str(p))
        save_file(t, str(p), metadata={"deepcovid": json.dumps({**meta, "format_version": FORMAT_VERSION + 1})})
        (tmp_path / "run3" / "best.json").unlink()
        load_checkpoint(p)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_wrong_arch_weights_are_refused(tmp_path):
    path = make_checkpoint(tmp_path / "run")
    ck = read_checkpoint(path)
    ck.meta["arch"] = "resnet50"
    with pytest.raises(CheckpointError, match="do not fit"):
        ck.build_model()


def test_best_resolves_to_highest_val_f1(tmp_path):
    make_checkpoint(tmp_path / "a", f1=0.7)
    make_checkpoint(tmp_path / "b", f1=0.9)
    make_checkpoint(tmp_path / "c", f1=0.8)
    assert resolve_checkpoint("best", tmp_path) == tmp_path / "b" / "best.safetensors"
    assert resolve_checkpoint(tmp_path / "a", tmp_path) == tmp_path / "a" / "best.safetensors"
    assert [m["run_dir"] for m in list_checkpoints(tmp_path)] == [str(tmp_path / r) for r in "bca"]
    with pytest.raises(CheckpointError, match="deepcovid train"):
        resolve_checkpoint("best", tmp_path / "empty")


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "run")
    good = path.read_bytes()
    import deepcovid.checkpoint as cp

    real_fsync = cp.os.fsync

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(cp.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        make_checkpoint(tmp_path / "run", seed=5)
    monkeypatch.setattr(cp.os, "fsync", real_fsync)
    assert path.read_bytes() == good  # the old best is intact
    assert not list((tmp_path / "run").glob(".*tmp"))  # no temp litter
    load_checkpoint(path)


def test_header_length_starting_with_pickle_byte_is_still_a_checkpoint(tmp_path):
    """A safetensors header length whose low byte is 0x80 (the pickle protocol marker) is valid."""
    path = make_checkpoint(tmp_path / "run")
    ck = read_checkpoint(path)
    for pad in range(256):
        p = save_checkpoint(tmp_path / "padded", "best", ck.state_dict, {**ck.meta, "pad": "x" * pad})
        if p.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    assert read_checkpoint(p).meta["pad"] == "x" * pad
