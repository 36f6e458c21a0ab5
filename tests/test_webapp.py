"""The Gradio app, launched in-test on a tiny random-init checkpoint and driven through
``gradio_client`` (the public ``/predict`` endpoint), plus its CLI, privacy and import contracts."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_checkpoint, make_image_folder, synthetic_xray

pytestmark = pytest.mark.timeout(300)

TRAIN_CMD = "deepcovid train --data ../shared/data/chest_xray --preset cpu-fast --output"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_test_temp_dir(tmp_path_factory) -> str:
    """One GRADIO_TEMP_DIR for the whole test session (gradio reads it at call time, so it must not change
    while an app is running)."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.getbasetemp() / "gradio-temp")
    Path(os.environ["GRADIO_TEMP_DIR"]).mkdir(parents=True, exist_ok=True)
    return os.environ["GRADIO_TEMP_DIR"]


def write_dicom16(path: Path, arr: np.ndarray) -> Path:
    """16-bit MONOCHROME2, uncompressed Explicit VR Little Endian, with the DICM preamble."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "ANON"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(arr, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("webapp-files")
    imgs = make_image_folder(root / "imgs", {"NORMAL": 2, "PNEUMONIA": 2}, size=64, seed=3)
    rng = np.random.default_rng(7)
    png16 = root / "xray16.png"
    base = synthetic_xray(rng, 96, positive=True).astype(np.uint16) * 257
    Image.fromarray(base).save(png16)  # uint16 -> mode I;16
    dcm = write_dicom16(root / "xray.dcm", (synthetic_xray(rng, 80, positive=False).astype(np.uint16) * 200 + 500))
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not a png" * 20)
    jpegs = sorted((imgs / "NORMAL").iterdir()) + sorted((imgs / "PNEUMONIA").iterdir())
    return SimpleNamespace(root=root, imgs=imgs, jpegs=jpegs, png16=png16, dcm=dcm, corrupt=corrupt)


@pytest.fixture(scope="module")
def served(tmp_path_factory, files):
    use_test_temp_dir(tmp_path_factory)
    from deepcovid.inference import Predictor
    from deepcovid.webapp import build_demo, launch_kwargs

    ckdir = tmp_path_factory.mktemp("webapp-ckpts")
    best = make_checkpoint(ckdir / "tiny-run", f1=0.8, threshold=0.5)
    make_checkpoint(ckdir / "other-run", f1=0.6, seed=1, threshold=0.3)
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(ckdir / "tiny-run" / "roc_val.png")
    demo = build_demo(checkpoints_dir=ckdir, examples_dir=files.imgs / "PNEUMONIA")
    port = free_port()
    kwargs = launch_kwargs()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **kwargs)
    url = f"http://127.0.0.1:{port}/"
    try:
        yield SimpleNamespace(demo=demo, url=url, ckdir=ckdir, best=best, kwargs=kwargs,
                              predictor=Predictor.from_checkpoint(best))
    finally:
        demo.close()


def client(url, tmp_path):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))


def api_predict(c, path, cam="gradcam", target="predicted"):
    from gradio_client import handle_file

    return c.predict(handle_file(str(path)), cam, target, api_name="/predict")


def assert_same(result, expected, tol=1e-5):
    label, probs, threshold, overlay = result
    assert label == expected.label
    assert set(probs) == set(expected.probabilities)
    for k, v in expected.probabilities.items():
        assert abs(probs[k] - v) <= tol, (k, probs[k], v)
    assert threshold == pytest.approx(expected.threshold)
    return overlay


# --------------------------------------------------------------------------------------------
# the API, end to end


def test_predict_matches_predictor(served, files, tmp_path):
    c = client(served.url, tmp_path)
    for path in (files.jpegs[0], files.jpegs[-1]):
        overlay = assert_same(api_predict(c, path), served.predictor.predict(path))
        with Image.open(overlay) as im:
            assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
            assert "research use only" in im.info["Comment"]
    # identical requests get distinct output files (Gradio names cached outputs by content hash and
    # does not write them atomically; see webapp.as_png_image)
    a, b = (api_predict(c, files.jpegs[0])[3] for _ in range(2))
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ia.info["deepcovid-id"] != ib.info["deepcovid-id"]
        assert np.array_equal(np.asarray(ia), np.asarray(ib))


def test_dicom_and_16bit_png(served, files, tmp_path):
    c = client(served.url, tmp_path)
    for path, size in ((files.dcm, (80, 80)), (files.png16, (96, 96))):
        overlay = assert_same(api_predict(c, path, cam="gradcam++"), served.predictor.predict(path))
        with Image.open(overlay) as im:
            assert im.size == size


def test_target_class_and_unknown_class(served, files, tmp_path):
    c = client(served.url, tmp_path)
    assert_same(api_predict(c, files.jpegs[0], target="NORMAL"), served.predictor.predict(files.jpegs[0]))
    with pytest.raises(Exception, match="unknown class"):
        api_predict(c, files.jpegs[0], target="COVID")


def test_corrupt_file_is_an_error_and_the_app_keeps_serving(served, files, tmp_path):
    c = client(served.url, tmp_path)
    with pytest.raises(Exception) as err:
        api_predict(c, files.corrupt)
    assert "corrupt.png" in str(err.value)  # the loader's readable message, not a generic one
    assert_same(api_predict(c, files.jpegs[1]), served.predictor.predict(files.jpegs[1]))


def test_eight_clients_in_parallel_get_their_own_results(served, files, tmp_path):
    images = [files.jpegs[0], files.jpegs[-1], files.png16, files.dcm]
    expected = [served.predictor.predict(p) for p in images]
    # the images must be told apart by their probabilities, or mixing results up would go unnoticed
    assert len({round(e.probabilities["PNEUMONIA"], 6) for e in expected}) == len(images)
    errors: list[BaseException] = []
    done: list[int] = []

    def worker(k: int):
        try:
            c = client(served.url, tmp_path / f"c{k}")
            for i in range(5):
                j = (k + i) % len(images)
                assert_same(api_predict(c, images[j]), expected[j])
                done.append(1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors[:3]
    assert len(done) == 40


# --------------------------------------------------------------------------------------------
# privacy


def test_privacy_settings(served, files, tmp_path):
    import gradio as gr

    from deepcovid.webapp import PRIVACY, launch_kwargs, parse_file_size

    demo = served.demo
    assert demo.analytics_enabled is False
    assert demo.delete_cache == PRIVACY["blocks"]["delete_cache"]
    freq, age = demo.delete_cache
    assert 0 < freq <= 300 and 0 < age <= 900
    assert demo.max_file_size == parse_file_size("50mb") == 50 * 1024 * 1024
    assert launch_kwargs()["max_file_size"] == 50 * 1024 * 1024
    assert demo.run_history is False and "runs" not in demo.footer_links
    assert demo.enable_monitoring is False
    assert demo.share is False
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    # nothing flags, nothing is stored in the browser
    assert PRIVACY["flagging_mode"] == "never"
    kinds = {type(b).__name__ for b in demo.blocks.values()}
    assert "BrowserState" not in kinds
    assert not any(isinstance(b, gr.Button) and "flag" in str(b.value).lower() for b in demo.blocks.values())
    assert not (Path.cwd() / ".gradio" / "flagged").exists()

    # an upload is deleted from Gradio's cache once it has been read; outputs are arrays, not our files
    c = client(served.url, tmp_path)
    fresh = tmp_path / "unique.png"
    arr = synthetic_xray(np.random.default_rng(123), 64, positive=True)
    Image.fromarray(arr).save(fresh)
    api_predict(c, fresh)
    payload = fresh.read_bytes()
    cache = Path(os.environ["GRADIO_TEMP_DIR"])
    leftovers = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size == len(payload)
                 and p.read_bytes() == payload]
    assert leftovers == []


def test_examples_are_never_deleted(served):
    uploads = served.demo.deepcovid["uploads"]
    cached = [p for b in served.demo.blocks.values() for p in getattr(b, "keep_in_cache", set())]
    assert cached, "examples should be in Gradio's cache"
    for p in cached:
        assert Path(p).is_file()
        name, data = uploads.take(p)
        assert data and Path(p).is_file()


def test_gradio_temp_dir_handling(tmp_path):
    from deepcovid.webapp import PRIVACY, prepare_environment

    env: dict[str, str] = {}
    created = prepare_environment(env)
    try:
        assert created and env["GRADIO_TEMP_DIR"] == created
        assert Path(created).is_dir() and not any(Path(created).iterdir())
        assert Path(created).name.startswith(PRIVACY["temp_dir_prefix"])
        assert env["GRADIO_ANALYTICS_ENABLED"] == "False"
    finally:
        os.rmdir(created)
    env = {"GRADIO_TEMP_DIR": str(tmp_path)}
    assert prepare_environment(env) is None and env["GRADIO_TEMP_DIR"] == str(tmp_path)


def test_upload_store_only_deletes_inside_the_upload_folder(tmp_path):
    from deepcovid.errors import ConfigError
    from deepcovid.webapp import UploadStore

    upload_dir = tmp_path / "up"
    (upload_dir / "abc").mkdir(parents=True)
    inside, outside = upload_dir / "abc" / "x.png", tmp_path / "y.png"
    inside.write_bytes(b"inside")
    outside.write_bytes(b"outside")
    store = UploadStore(lambda: str(upload_dir), ttl=60)
    assert store.take(inside) == ("x.png", b"inside") and not inside.exists()
    assert store.take(inside) == ("x.png", b"inside")  # served from memory, e.g. a re-run
    assert store.take(outside) == ("y.png", b"outside") and outside.exists()
    store.clear()
    with pytest.raises(ConfigError, match="upload it again"):
        store.take(inside)


# --------------------------------------------------------------------------------------------
# page content


def test_model_selector_card_and_decision_text(served):
    from deepcovid.webapp import decision_text, find_roc_png, model_card_markdown

    registry = served.demo.deepcovid["registry"]
    choices = registry.choices()
    labels = [label for label, _ in choices]
    assert labels == ["efficientnet_lite0 · tiny-run · val F1 0.80", "efficientnet_lite0 · other-run · val F1 0.60"]
    assert registry.default_path == str(served.best.resolve())
    # the other model is loaded only when picked (the default one is loaded by the first request,
    # so whether it is loaded yet depends on which tests ran before this one)
    assert set(registry.loaded()) <= {registry.default_path}
    card = model_card_markdown(registry.entry(None))
    for text in ("efficientnet_lite0", "Decision threshold", "0.500", "Training data", "| NORMAL | 10 | 2 |",
                 "Validation metrics", "| accuracy | precision | recall | specificity | f1 | auc | loss |",
                 "| 1.000 | 1.000 | 1.000 | 1.000 | 0.800 | 1.000 | 0.500 |", "TP 1, FN 0, FP 0, TN 1"):
        assert text in card
    assert find_roc_png(served.best.parent) == served.best.parent / "roc_val.png"
    assert find_roc_png(served.ckdir / "other-run") is None

    pos = SimpleNamespace(label="PNEUMONIA", probabilities={"NORMAL": 0.13, "PNEUMONIA": 0.87}, threshold=0.42,
                          positive_class="PNEUMONIA")
    assert decision_text(pos) == "Model output: PNEUMONIA (p=0.87 ≥ threshold 0.42)"
    neg = SimpleNamespace(label="NORMAL", probabilities={"NORMAL": 0.581, "PNEUMONIA": 0.419}, threshold=0.42,
                          positive_class="PNEUMONIA")
    assert decision_text(neg) == "Model output: NORMAL (p(PNEUMONIA)=0.419 < threshold 0.420)"


def test_model_card_shows_the_runs_held_out_test_scores_with_their_intervals(tmp_path):
    import json

    from deepcovid.metrics import binary_metrics, bootstrap_ci
    from deepcovid.webapp import model_card_markdown

    entry = {"arch": "efficientnet_lite0", "classes": ["NORMAL", "PNEUMONIA"], "positive_class": "PNEUMONIA",
             "threshold": 0.5, "val_metrics": {"f1": 0.9}, "run_dir": str(tmp_path)}
    assert "Held-out" not in model_card_markdown(entry)  # a run without a test report
    y, p = [1, 1, 1, 0, 0, 0, 1, 0], [0.9, 0.8, 0.4, 0.3, 0.6, 0.1, 0.7, 0.2]
    report = {**binary_metrics(y, p, 0.5), "n": 8, "ci95": bootstrap_ci(y, p, 0.5)}
    (tmp_path / "test_metrics.json").write_text(json.dumps(report))
    card = model_card_markdown(entry)
    lo, hi = report["ci95"]["auc"]
    assert "Held-out test images** (8 images" in card and f"| {report['auc']:.3f} |" in card
    assert f"| {lo:.3f}–{hi:.3f} |" in card and "95 % interval over the images" in card
    for broken in ("[1, 2", "[1, 2]", json.dumps({**report, "auc": "high"}), json.dumps({**report, "ci95": {"auc": [1]}})):
        (tmp_path / "test_metrics.json").write_text(broken)  # unreadable or not ours: the card goes without it
        assert "Held-out" not in model_card_markdown(entry) and "efficientnet_lite0" in model_card_markdown(entry)


def test_page_config_has_disclaimer_and_upload_types(served):
    import json

    import httpx

    cfg = httpx.get(served.url + "config", timeout=30).json()
    text = json.dumps(cfg, ensure_ascii=False)
    assert "Research use only — not a medical device. The heatmap shows what drove the model, not where disease is." in text
    upload = next(c for c in cfg["components"] if c.get("props", {}).get("elem_id") == "dc-upload")
    assert upload["type"] == "file"
    assert {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"} <= set(upload["props"]["file_types"])
    assert "Score-CAM (slow)" in text
    assert cfg.get("analytics_enabled") is False


def test_public_warning_banner(served):
    from deepcovid.webapp import PUBLIC_BANNER, build_demo

    demo = build_demo(registry=served.demo.deepcovid["registry"], public_warning=True)
    values = [getattr(b, "value", None) for b in demo.blocks.values()]
    assert PUBLIC_BANNER in values


# --------------------------------------------------------------------------------------------
# command line


def parse(argv):
    from deepcovid.webapp import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_defaults():
    args = parse([])
    assert (args.checkpoint, args.checkpoints_dir, args.host, args.max_file_size) == \
        ("best", "checkpoints", "127.0.0.1", "50mb")
    assert not args.share and args.auth is None


def test_share_needs_a_login(tmp_path, capsys, monkeypatch):
    from deepcovid.errors import ConfigError
    from deepcovid.webapp import check_share, main, resolve_auth

    monkeypatch.delenv("DEEPCOVID_AUTH", raising=False)
    assert main(["--share", "--checkpoints-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Refusing to share without a login" in err and "--auth" in err and "--share-without-auth" in err
    assert "Traceback" not in err

    from deepcovid.cli import main as cli_main

    assert cli_main(["serve", "--share", "--checkpoints-dir", str(tmp_path)]) == 2
    assert "Refusing to share" in capsys.readouterr().err

    args = parse(["--share", "--auth", "u:p"])
    assert resolve_auth(args, environ={}) == [("u", "p")]
    check_share(args, resolve_auth(args, environ={}))  # accepted

    args = parse(["--share"])
    assert resolve_auth(args, environ={"DEEPCOVID_AUTH": "alice:s3:cr3t"}) == [("alice", "s3:cr3t")]
    with pytest.raises(ConfigError):
        check_share(args, resolve_auth(args, environ={}))

    auth_file = tmp_path / "logins.txt"
    auth_file.write_text("# team\nbob:pw1\n\ncarol:pw2\n")
    args = parse(["--share", "--auth-file", str(auth_file)])
    assert resolve_auth(args, environ={}) == [("bob", "pw1"), ("carol", "pw2")]

    check_share(parse(["--share", "--share-without-auth"]), [])  # allowed, with a loud warning in run()
    with pytest.raises(ConfigError, match="USER:PASS"):
        resolve_auth(parse(["--auth", "nopassword"]), environ={})


def test_launch_kwargs_carry_login_and_privacy():
    from deepcovid.webapp import PRIVACY, launch_kwargs

    kw = launch_kwargs(parse(["--port", "7999", "--auth", "u:p", "--max-file-size", "20mb"]), [("u", "p")])
    assert kw["auth"] == [("u", "p")] and kw["server_port"] == 7999 and kw["server_name"] == "127.0.0.1"
    assert kw["max_file_size"] == 20 * 1024 * 1024
    for k, v in PRIVACY["launch"].items():
        assert kw[k] == v
    assert kw["run_history"] is False and kw["enable_monitoring"] is False and kw["share"] is False


def _run_py(args, cwd, env_extra=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("GRADIO_TEMP_DIR", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_no_checkpoint_gives_the_training_command(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run_py([str(REPO / "app.py"), "--checkpoints-dir", str(empty)], cwd=tmp_path)
    assert r.returncode != 0
    assert f"{TRAIN_CMD} {empty}" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    # the default folder gives the exact command from the README
    r = _run_py([str(REPO / "app.py")], cwd=tmp_path)
    assert r.returncode != 0 and f"{TRAIN_CMD} checkpoints" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob(".gradio*"))  # nothing written next to the app


def test_importing_app_loads_nothing_heavy(tmp_path):
    code = (
        "import sys, socket\n"
        "def no_net(*a, **k): raise AssertionError('network used at import')\n"
        "socket.socket.connect = no_net; socket.create_connection = no_net\n"
        "import app\n"
        "assert callable(app.build_demo)\n"
        "heavy = [m for m in ('torch', 'gradio', 'deepcovid.inference', 'deepcovid.models', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    r = _run_py(["-c", code], cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_models_are_loaded_lazily_once_per_path(served):
    from deepcovid.webapp import ModelRegistry

    reg = ModelRegistry.from_dir(served.ckdir, "best")
    assert reg.loaded() == []
    other = next(path for _, path in reg.choices() if "other-run" in path)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(reg.get(other))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(p) for p in got}) == 1 and reg.loaded() == [other]
    assert got[0].threshold == pytest.approx(0.3)
    from deepcovid.errors import ConfigError

    with pytest.raises(ConfigError):
        reg.get("/etc/passwd")  # only listed checkpoints can be picked


def test_bad_max_file_size_is_a_config_error():
    from deepcovid.errors import ConfigError
    from deepcovid.webapp import parse_file_size

    assert parse_file_size("500kb") == 500 * 1024 and parse_file_size("1GB") == 1024 ** 3
    for bad in ("", "50 parsecs", "-1mb", "0mb"):
        with pytest.raises(ConfigError):
            parse_file_size(bad)
