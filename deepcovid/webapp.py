"""The Gradio web page and the ``deepcovid serve`` subcommand (``python app.py`` is the same).

Research use only — not a medical device. The heat map shows what drove the model, not where
disease is.

Start it::

    deepcovid serve                          # or: python app.py
    deepcovid serve --checkpoint checkpoints/<run> --examples-dir ../shared/data/chest_xray/test/PNEUMONIA

Privacy by default (all settings live in ``PRIVACY`` / ``launch_kwargs``): Gradio analytics,
run history, the monitoring endpoint, MCP and flagging are off; Gradio's file cache lives in a
fresh temporary folder (``GRADIO_TEMP_DIR``) that is swept every minute (files older than five
minutes) and removed on exit; every upload is deleted from disk as soon as it has been read
(its bytes stay in memory for at most five minutes so that re-running with another CAM method
works); results are returned as in-memory arrays and nothing is stored in the browser.
``--share`` is refused without a login (``--auth``, ``--auth-file`` or ``DEEPCOVID_AUTH``).

API (named endpoint ``/predict``) from Python with ``gradio_client``::

    from gradio_client import Client, handle_file

    client = Client("http://127.0.0.1:7860/")   # add auth=("user", "pass") if the app has a login
    label, probabilities, threshold, overlay_png = client.predict(
        handle_file("chest_xray.dcm"),   # DICOM, PNG (8/16 bit), JPEG, TIFF, BMP or WebP
        "gradcam",                       # gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, scorecam
        "predicted",                     # class to explain: "predicted" or a class name, e.g. "PNEUMONIA"
        api_name="/predict",
    )
    print(label, probabilities, threshold)  # PNEUMONIA {'NORMAL': 0.13, 'PNEUMONIA': 0.87} 0.42
    print(overlay_png)                      # local path of the Grad-CAM overlay (PNG)

This module imports neither torch nor gradio at import time, so ``import app`` stays cheap and
never loads a model.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .errors import ConfigError, DeepCovidError

log = logging.getLogger(__name__)

TITLE = "deepcovid — chest X-ray classifier with Grad-CAM (research use only)"
DISCLAIMER = ("Research use only — not a medical device. "
              "The heatmap shows what drove the model, not where disease is.")
TRAIN_COMMAND = "deepcovid train --data ../shared/data/chest_xray --preset cpu-fast --output checkpoints"
FILE_TYPES = [".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"]
DEFAULT_MAX_FILE_SIZE = "50mb"
DEFAULT_CONCURRENCY = 2
AUTH_ENV = "DEEPCOVID_AUTH"
PREDICTED = "predicted"
MAX_EXAMPLES = 12

CAM_LABELS = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "hirescam": "HiResCAM",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "eigencam": "Eigen-CAM",
    "scorecam": "Score-CAM (slow)",
}

# Every privacy-relevant setting, in one place (tests assert on it).
PRIVACY: dict[str, Any] = {
    # gr.Blocks(...)
    "blocks": {
        "analytics_enabled": False,
        "delete_cache": (60, 300),  # every 60 s, delete cached files older than 300 s
    },
    # demo.launch(...)
    "launch": {
        "run_history": False,        # no run history kept in the browser (Gradio 6)
        "enable_monitoring": False,  # no /monitoring traffic endpoint
        "mcp_server": False,
        "pwa": False,
        "ssr_mode": False,           # no Node server
        "show_error": False,         # only our own gr.Error messages reach the page
        "footer_links": ["api", "settings"],
    },
    # environment, set before gradio is imported
    "env": {
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_RUN_HISTORY": "False",
        "GRADIO_FLAGGING_MODE": "never",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "1",
    },
    "flagging_mode": "never",       # no gr.Interface/flagging anywhere on the page
    "upload_ttl_s": 300,            # uploaded bytes are kept in memory at most this long
    "upload_memory_bytes": 256 * 1024 * 1024,
    "temp_dir_prefix": "deepcovid-gradio-",
}

SHARE_REFUSED = (
    "--share publishes this app on a public *.gradio.live address: anyone who learns the link could "
    "upload images to this machine and see the model's output. Refusing to share without a login.\n"
    f"  Add a login: --auth USER:PASS, --auth-file FILE (lines USER:PASS) or {AUTH_ENV}=USER:PASS.\n"
    "  To share without a login anyway (not recommended), add --share-without-auth."
)
SHARE_WITHOUT_AUTH_WARNING = (
    "WARNING: sharing this app on a PUBLIC link WITHOUT A LOGIN (--share-without-auth). Anyone with the "
    "link can use it. Research use only — not a medical device; do not upload identifiable patient data."
)
PUBLIC_BANNER = (
    "⚠️ **This page is shared on a public link without a login.** Anyone with the link can use it. "
    "Do not upload identifiable patient data."
)


# --------------------------------------------------------------------------------------------
# arguments, logins, environment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="best",
                        help="'best' (highest validation F1 under --checkpoints-dir), a run folder or a "
                             ".safetensors file (default: best)")
    parser.add_argument("--checkpoints-dir", default="checkpoints",
                        help="folder searched for checkpoints; all of them are offered in the page (default: checkpoints)")
    parser.add_argument("--examples-dir", default=None,
                        help="folder of example images shown under the upload box (optional)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"requests processed at the same time (default: {DEFAULT_CONCURRENCY})")
    parser.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE,
                        help=f"largest accepted upload, e.g. 20mb, 1gb (default: {DEFAULT_MAX_FILE_SIZE})")
    parser.add_argument("--share", action="store_true",
                        help="also publish on a temporary public gradio.live link (needs a login)")
    parser.add_argument("--auth", metavar="USER:PASS", default=None,
                        help=f"require this login (visible in the process list: prefer --auth-file or {AUTH_ENV})")
    parser.add_argument("--auth-file", metavar="PATH", default=None,
                        help="file of logins, one USER:PASS per line (# comments allowed)")
    parser.add_argument("--share-without-auth", action="store_true",
                        help="allow --share without a login (not recommended)")


def _parse_login(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user.strip() or not password:
        raise ConfigError(f"{where}: a login must look like USER:PASS (non-empty user and password)")
    return user.strip(), password


def resolve_auth(args: argparse.Namespace, environ=None) -> list[tuple[str, str]]:
    """Logins from ``--auth``, ``--auth-file`` and ``$DEEPCOVID_AUTH`` (all of them apply)."""
    environ = os.environ if environ is None else environ
    logins: list[tuple[str, str]] = []
    if getattr(args, "auth", None):
        logins.append(_parse_login(args.auth, "--auth"))
    auth_file = getattr(args, "auth_file", None)
    if auth_file:
        path = Path(auth_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--auth-file {path}: cannot read it ({exc.strerror or exc})") from exc
        found = [_parse_login(line, f"--auth-file {path}, line {i}")
                 for i, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ConfigError(f"--auth-file {path} holds no USER:PASS line")
        logins.extend(found)
    env = environ.get(AUTH_ENV, "")
    if env.strip():
        logins.append(_parse_login(env, f"${AUTH_ENV}"))
    return logins


def check_share(args: argparse.Namespace, logins: list[tuple[str, str]]) -> None:
    """Refuse ``--share`` without a login unless ``--share-without-auth`` (ConfigError: exit code 2)."""
    if getattr(args, "share_without_auth", False) and not getattr(args, "share", False):
        raise ConfigError("--share-without-auth only makes sense together with --share")
    if getattr(args, "share", False) and not logins and not getattr(args, "share_without_auth", False):
        raise ConfigError(SHARE_REFUSED)


def parse_file_size(value) -> int:
    """'50mb' -> bytes (the units Gradio's ``max_file_size`` understands)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+)\s*(b|kb|mb|gb|tb)?\s*", str(value), flags=re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"--max-file-size {value!r}: give a positive size such as 500kb, 50mb or 1gb")
    unit = (m.group(2) or "b").lower()
    return int(m.group(1)) * {"b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3, "tb": 1024 ** 4}[unit]


def prepare_environment(environ=None) -> str | None:
    """Privacy environment, before gradio is imported. Returns the temp folder it created
    for ``GRADIO_TEMP_DIR`` (None when one was already set)."""
    environ = os.environ if environ is None else environ
    for key, value in PRIVACY["env"].items():
        if key == "HF_HUB_OFFLINE":
            environ.setdefault(key, value)
        else:
            environ[key] = value
    if environ.get("GRADIO_TEMP_DIR"):
        return None
    created = tempfile.mkdtemp(prefix=PRIVACY["temp_dir_prefix"])
    environ["GRADIO_TEMP_DIR"] = created
    return created


def launch_kwargs(args: argparse.Namespace | None = None, logins: list[tuple[str, str]] | None = None) -> dict:
    """Keyword arguments for ``demo.launch`` (privacy settings included)."""
    kw: dict[str, Any] = dict(PRIVACY["launch"])
    kw["footer_links"] = list(kw["footer_links"])
    kw["max_file_size"] = parse_file_size(getattr(args, "max_file_size", None) or DEFAULT_MAX_FILE_SIZE)
    if args is not None:
        kw["server_name"] = args.host
        kw["server_port"] = args.port
        kw["share"] = bool(args.share)
    if logins:
        kw["auth"] = list(logins)
        kw["auth_message"] = "deepcovid — research use only, not a medical device. Please log in."
    kw["css"] = CSS
    kw["theme"] = page_theme()
    return kw


def page_theme():
    """Gradio's default look with system fonts: nothing is fetched for fonts, and the bundled
    Source Sans Pro semi-bold file (a partial subset in gradio 6.31) is not used."""
    import gradio as gr

    return gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                             font_mono=("ui-monospace", "Consolas", "monospace"))


CSS = """
.dc-disclaimer {border-left: 4px solid #d97706; background: rgba(217,119,6,0.08); padding: 6px 12px; border-radius: 4px;}
.dc-banner {border-left: 4px solid #dc2626; background: rgba(220,38,38,0.10); padding: 6px 12px; border-radius: 4px;}
.dc-decision h3 {margin-top: 0;}
#dc-overlay img, #dc-heatmap img, #dc-preview img {width: 100%; height: 100%; object-fit: contain;}
/* The gallery's floating label covered the top of the first grid, its title bar. */
#dc-activations .grid-container {padding-top: 30px;}
/* In a narrow window the card's tables scroll sideways instead of breaking words mid-way ("pre/cisi/on", "0.9/97"). */
#dc-model-card table {display: block; max-width: 100%; overflow-x: auto; border: none;}
#dc-model-card td, #dc-model-card th {word-break: normal; overflow-wrap: normal;}
#dc-model-card tr > :first-child {white-space: nowrap;}
"""


# --------------------------------------------------------------------------------------------
# uploads


class UploadStore:
    """Reads an uploaded file once, deletes it from Gradio's cache folder, and keeps its bytes
    in memory for ``ttl`` seconds so that a re-run on the same upload (another CAM method, or a
    second client that uploaded identical bytes: Gradio names uploads by content hash) works.
    Only files inside the upload folder are ever deleted, never example files."""

    def __init__(self, upload_dir_fn, protected_fn=lambda: set(), ttl: float = 300.0,
                 max_bytes: int = 256 * 1024 * 1024):
        self._upload_dir_fn = upload_dir_fn
        self._protected_fn = protected_fn
        self.ttl = float(ttl)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._mem: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def _expire(self, now: float) -> None:
        for key in [k for k, (t, _) in self._mem.items() if now - t > self.ttl]:
            del self._mem[key]
        total = sum(len(b) for _, b in self._mem.values())
        while self._mem and total > self.max_bytes:
            _, (_, b) = self._mem.popitem(last=False)
            total -= len(b)

    def _deletable(self, path: Path) -> bool:
        try:
            root = Path(self._upload_dir_fn()).resolve()
            real = path.resolve()
        except OSError:
            return False
        if real == root or root not in real.parents:
            return False
        protected = {str(Path(p).resolve()) for p in self._protected_fn()}
        return str(real) not in protected

    def take(self, path: str | os.PathLike) -> tuple[str, bytes]:
        """(file name, bytes) of an upload; deletes the upload from disk."""
        p = Path(str(path))
        key = str(p)
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            try:
                data = p.read_bytes()
            except FileNotFoundError:
                hit = self._mem.get(key)
                if hit is None:
                    raise ConfigError("the uploaded file is no longer on the server (uploads are deleted after "
                                      "use and kept in memory for 5 minutes); please upload it again") from None
                data = hit[1]
            except OSError as exc:
                raise ConfigError(f"cannot read the uploaded file {p.name}: {exc.strerror or exc}") from exc
            if self._deletable(p):
                self._mem[key] = (now, data)
                self._mem.move_to_end(key)
                self._expire(now)
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:  # pragma: no cover - best effort
                    log.warning("could not delete upload %s: %s", p, exc)
        return p.name, data

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()


def _named_bytes(name: str, data: bytes):
    import io

    f = io.BytesIO(data)
    f.name = name  # load_image uses it in its messages
    return f


# --------------------------------------------------------------------------------------------
# models


def _model_label(entry: dict) -> str:
    vm = entry.get("val_metrics") or {}
    f1 = vm.get("f1")
    f1_text = f"{float(f1):.2f}" if isinstance(f1, (int, float)) else "n/a"
    run = entry.get("run") or Path(entry.get("path", "")).parent.name
    return f"{entry.get('arch', '?')} · {run} · val F1 {f1_text}"


class ModelRegistry:
    """Every checkpoint the page offers; Predictors are loaded lazily, once per path, under a lock."""

    def __init__(self, entries: list[dict], default_path: str, device: str = "auto", loader=None):
        self.entries: dict[str, dict] = {}
        for e in entries:
            self.entries[str(Path(e["path"]).resolve())] = e
        self.default_path = str(Path(default_path).resolve())
        self.device = device
        self._loader = loader
        self._predictors: dict[str, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, checkpoints_dir, checkpoint="best", device: str = "auto", predictor=None) -> "ModelRegistry":
        from .checkpoint import list_checkpoints, resolve_checkpoint

        entries = list_checkpoints(Path(checkpoints_dir))
        if predictor is not None and getattr(predictor, "path", None):
            default = str(predictor.path)
        else:
            default = str(resolve_checkpoint(checkpoint, checkpoints_dir))
        reg = cls(entries, default, device=device)
        if predictor is not None:
            reg.add(predictor)
        elif reg.default_path not in reg.entries:
            reg.entries[reg.default_path] = reg._entry_for_file(Path(default))
        return reg

    @staticmethod
    def _entry_for_file(weights: Path) -> dict:
        sidecar = weights.with_suffix(".json")
        meta: dict = {}
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            pass
        if "arch" not in meta:  # no sidecar: read the metadata embedded in the weights file
            from .checkpoint import read_checkpoint

            meta = read_checkpoint(weights).meta
        return {**meta, "path": str(weights), "run_dir": str(weights.parent)}

    def add(self, predictor) -> None:
        """Register an already loaded Predictor (its path becomes the default)."""
        path = str(Path(predictor.path).resolve()) if predictor.path else f"<memory:{id(predictor)}>"
        entry = self.entries.get(path) or {**predictor.meta, "path": path,
                                           "run_dir": str(Path(path).parent) if predictor.path else None}
        self.entries[path] = entry
        self.default_path = path
        with self._lock:
            self._predictors[path] = predictor

    def choices(self) -> list[tuple[str, str]]:
        labels: dict[str, int] = {}
        out = []
        for path, entry in self.entries.items():
            label = _model_label(entry)
            labels[label] = labels.get(label, 0) + 1
            if labels[label] > 1:
                label = f"{label} ({Path(path).parent.name}/{Path(path).name})"
            out.append((label, path))
        return out

    def entry(self, path: str | None) -> dict:
        key = self.default_path if not path else str(path)
        if key not in self.entries:
            raise ConfigError("unknown model; pick one from the list")
        return self.entries[key]

    def get(self, path: str | None = None):
        key = self.default_path if not path else str(path)
        self.entry(key)
        with self._lock:
            pred = self._predictors.get(key)
            if pred is None:
                if self._loader is not None:
                    pred = self._loader(key)
                else:
                    from .inference import Predictor

                    pred = Predictor.from_checkpoint(key, device=self.device)
                self._predictors[key] = pred
        return pred

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._predictors)


# --------------------------------------------------------------------------------------------
# text


def _fmt_pair(p: float, t: float) -> tuple[str, str]:
    """Format p and t with as few decimals (>= 2) as keep them visibly apart when they differ."""
    for d in (2, 3, 4, 6):
        a, b = f"{p:.{d}f}", f"{t:.{d}f}"
        if a != b or p == t:
            return a, b
    return f"{p:.6f}", f"{t:.6f}"


def decision_text(pred) -> str:
    """'Model output: PNEUMONIA (p=0.87 ≥ threshold 0.42)'."""
    label = pred.label
    probs = pred.probabilities
    if pred.threshold is not None and pred.positive_class:
        p = float(probs[pred.positive_class])
        ps, ts = _fmt_pair(p, float(pred.threshold))
        if label == pred.positive_class:
            return f"Model output: {label} (p={ps} ≥ threshold {ts})"
        return f"Model output: {label} (p({pred.positive_class})={ps} < threshold {ts})"
    return f"Model output: {label} (p={float(probs[label]):.2f}, the highest of {len(probs)} classes)"


def _md_escape(text: str) -> str:
    """Escape what could break a table or start markup (intraword underscores are harmless)."""
    return re.sub(r"([\\`*{}\[\]<>|#])", r"\\\1", str(text))


def result_markdown(exp) -> str:
    lines = [f"### {_md_escape(decision_text(exp))}"]
    method = CAM_LABELS.get(exp.cam_method, exp.cam_method).replace(" (slow)", "")
    ck = exp.checkpoint or {}
    lines.append(f"Heat map: {method} for class **{_md_escape(exp.target_class)}** · model "
                 f"{_md_escape(ck.get('arch', '?'))} · run {_md_escape(ck.get('run') or '?')}")
    if exp.notes:
        lines.append("")
        lines.append("Image notes: " + "; ".join(_md_escape(n) for n in exp.notes))
    lines.append("")
    lines.append(f"*{DISCLAIMER}*")
    return "\n".join(lines)


def _fmt_metric(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}"
    return _md_escape(v)


def model_card_markdown(entry: dict) -> str:
    classes = list(entry.get("classes") or [])
    pos = entry.get("positive_class")
    thr = entry.get("threshold")
    run = entry.get("run") or (Path(entry["path"]).parent.name if entry.get("path") else "?")
    rows = [
        ("Architecture", f"{entry.get('arch', '?')} (input {entry.get('input_size', '?')} px, "
                         f"colour space {entry.get('color_space', 'rgb')}"
                         + (f", CLAHE clip {entry['clahe']}" if entry.get("clahe") else "") + ")"),
        ("Run", f"{run} (epoch {entry.get('epoch', '?')})"),
        ("Checkpoint file", Path(entry.get("path", "?")).name),
        ("Classes", ", ".join(classes) + (f" (positive: {pos})" if pos else "")),
    ]
    members = entry.get("members")
    if isinstance(members, list) and members:
        rows.append(("Ensemble of", "; ".join(
            f"{m.get('arch', '?')} ({m.get('run', '?')}, val F1 {_fmt_metric((m.get('val_metrics') or {}).get('f1'))})"
            for m in members if isinstance(m, dict)) + " — mean of their probabilities"))
    if entry.get("tta") == "hflip":
        rows.append(("Test-time augmentation", "each image and its left-right mirror; their mean probability "
                                               "(the heat map: the mean of their two maps)"))
    if thr is not None and pos:
        rows.append(("Decision threshold", f"{float(thr):.3f} on p({pos})"))
    elif len(classes) > 2:
        rows.append(("Decision", "highest probability"))
    out = ["### Model card", "", "| property | value |", "|---|---|"]
    out += [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in rows]

    data = entry.get("data") or {}
    splits = [(name, data.get(f"{name}_counts")) for name in ("train", "val", "test")]
    splits = [(n, c) for n, c in splits if isinstance(c, dict) and c]
    if splits:
        names = sorted({k for _, c in splits for k in c}, key=lambda k: (classes.index(k) if k in classes else 99, k))
        out += ["", "**Training data** (images per class)", "",
                "| class | " + " | ".join(n for n, _ in splits) + " |",
                "|---|" + "---:|" * len(splits)]
        for k in names:
            out.append(f"| {_md_escape(k)} | " + " | ".join(str(c.get(k, 0)) for _, c in splits) + " |")
        out.append("| **total** | " + " | ".join(str(sum(int(v) for v in c.values())) for _, c in splits) + " |")

    vm = entry.get("val_metrics") or {}
    if vm:
        scores = [k for k in ("accuracy", "precision", "recall", "specificity", "f1", "auc", "loss") if k in vm]
        counts = [k for k in ("tp", "fn", "fp", "tn") if k in vm]
        rest = sorted(k for k in vm if k not in scores and k not in counts)
        keys = scores + rest
        out += ["", "**Validation metrics**" + (f" (at threshold {float(thr):.3f})" if thr is not None and pos else ""), ""]
        if keys:
            out += ["| " + " | ".join(_md_escape(k) for k in keys) + " |", "|" + "---:|" * len(keys),
                    "| " + " | ".join(_fmt_metric(vm[k]) for k in keys) + " |"]
        if counts:
            out += ["", "Confusion counts: " + ", ".join(f"{k.upper()} {_fmt_metric(vm[k])}" for k in counts)]
    out += _test_report_markdown(entry.get("run_dir"))
    return "\n".join(out)


def _test_report_markdown(run_dir) -> list[str]:
    """The run's own ``test_metrics.json`` (written by training on ``ROOT/test``, never used to
    choose anything) with its 95 % intervals: validation comes from the training distribution
    and overstates, so the card shows the held-out scores too when the run has them."""
    if not run_dir:
        return []
    from .metrics import CI_KEYS as keys  # the six two-class scores, each with an interval
    try:
        tm = json.loads((Path(run_dir) / "test_metrics.json").read_text())
        scores = [_fmt_metric(float(tm[k])) for k in keys]
        ci = tm.get("ci95")
        spans = [f"{_fmt_metric(float(ci[k][0]))}–{_fmt_metric(float(ci[k][1]))}" for k in keys] if ci else None
        n = int(tm["n"])
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):  # absent or not ours: go without
        return []
    out = ["", f"**Held-out test images** ({n} images from the training data's `test/` folder, at the same "
               "threshold; reported, never used to choose anything)", "",
           "| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys), "| " + " | ".join(scores) + " |"]
    if spans:
        out += ["| " + " | ".join(spans) + " |", "",
                "Second row: 95 % interval over the images (how much the score depends on which images were drawn)."]
    return out


def find_roc_png(run_dir) -> Path | None:
    if not run_dir:
        return None
    d = Path(run_dir)
    if not d.is_dir():
        return None
    first = d / "roc_val.png"
    if first.is_file():
        return first
    found = sorted(p for p in d.glob("*.png") if "roc" in p.name.lower())
    return found[0] if found else None


def as_png_image(arr, what: str = "image"):
    """A numpy image -> PIL image carrying PNG text metadata: a disclaimer and a per-response id.

    Gradio writes each returned image to its cache under a hash of the encoded bytes and does not
    write atomically, so two requests returning the *same* pixels at the same moment (two users,
    the same example) would overwrite a file while it is being downloaded. The unique id makes
    every response's file distinct; the pixels are untouched."""
    import uuid

    from PIL import Image

    if arr is None:
        return None
    im = Image.fromarray(arr)
    im.info["Comment"] = f"deepcovid {what} - research use only, not a medical device"
    im.info["deepcovid-id"] = uuid.uuid4().hex
    return im


def _read_png(path: Path):
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:  # a broken plot must not break the page
        log.warning("cannot read ROC plot %s", path, exc_info=True)
        return None


def _example_files(examples_dir) -> list[str]:
    if not examples_dir:
        return []
    d = Path(examples_dir)
    if not d.is_dir():
        return []
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in FILE_TYPES)
    return [str(p.resolve()) for p in files[:MAX_EXAMPLES]]


# --------------------------------------------------------------------------------------------
# the page


def build_demo(predictor=None, *, checkpoints_dir="checkpoints", checkpoint="best", examples_dir=None,
               device: str = "auto", public_warning: bool = False,
               concurrency: int = DEFAULT_CONCURRENCY, registry: ModelRegistry | None = None):
    """The Gradio page. ``predictor``: an already loaded Predictor to preselect (optional);
    otherwise ``checkpoint`` is resolved under ``checkpoints_dir`` (CheckpointError when none)."""
    created = prepare_environment()
    if created:  # embedded use (not `run`): remove the cache folder when the process ends
        atexit.register(shutil.rmtree, created, True)
    import gradio as gr

    if registry is None:
        registry = ModelRegistry.from_dir(checkpoints_dir, checkpoint, device=device, predictor=predictor)
    from .inference import CAM_METHODS, SLOW_CAM_MESSAGE

    default_entry = registry.entry(None)
    default_classes = list(default_entry.get("classes") or [])
    cam_choices = [(CAM_LABELS.get(m, m), m) for m in CAM_METHODS]
    examples = _example_files(examples_dir)
    demo_ref: dict[str, Any] = {}

    def protected_files() -> set[str]:
        demo = demo_ref.get("demo")
        keep: set[str] = set()
        if demo is not None:
            for block in demo.blocks.values():
                keep.update(str(p) for p in getattr(block, "keep_in_cache", set()) or ())
        keep.update(examples)
        return keep

    from gradio.utils import get_upload_folder

    uploads = UploadStore(get_upload_folder, protected_files, ttl=PRIVACY["upload_ttl_s"],
                          max_bytes=PRIVACY["upload_memory_bytes"])

    def _user_error(exc: Exception):
        return gr.Error(str(exc), print_exception=False)

    def _target(value, pred) -> str | None:
        if value in (None, "", PREDICTED):
            return None
        if value not in pred.classes:
            raise ConfigError(f"unknown class {value!r}; this model's classes are: {', '.join(pred.classes)}")
        return value

    def _explain(file_path, model_path, cam_method, target, alpha, activations):
        if not file_path:
            raise ConfigError("upload a chest X-ray first (DICOM, PNG, JPEG, TIFF, BMP or WebP)")
        name, data = uploads.take(file_path)
        pred = registry.get(model_path)
        from .imageio import load_image

        image = load_image(_named_bytes(name, data))  # exactly as Predictor.predict(path) loads it
        return pred.explain(image, cam_method=cam_method or "gradcam", target_class=_target(target, pred),
                            alpha=float(0.5 if alpha is None else alpha), activations=bool(activations))

    def analyze(file_path, model_path, cam_method, target, alpha, activations):
        try:
            exp = _explain(file_path, model_path, cam_method, target, alpha, activations)
        except DeepCovidError as exc:
            raise _user_error(exc) from None
        except gr.Error:
            raise
        except Exception:
            log.exception("analysis failed")
            raise gr.Error("unexpected error while analysing the image (see the server log)",
                           print_exception=False) from None
        gallery = [(as_png_image(grid, f"activation maps of {name}"), name) for name, grid in exp.activations]
        return (result_markdown(exp), dict(exp.probabilities), as_png_image(exp.overlay, "Grad-CAM overlay"),
                as_png_image(exp.heatmap, "heat map"),
                gr.update(value=gallery, visible=bool(activations)))

    def api_predict(file, cam_method, target_class):
        """Label, class probabilities, decision threshold and Grad-CAM overlay for one X-ray."""
        try:
            exp = _explain(file, None, cam_method, target_class, 0.5, False)
        except DeepCovidError as exc:
            raise _user_error(exc) from None
        except Exception:
            log.exception("analysis failed")
            raise gr.Error("unexpected error while analysing the image (see the server log)",
                           print_exception=False) from None
        return exp.label, dict(exp.probabilities), exp.threshold, as_png_image(exp.overlay, "Grad-CAM overlay")

    def preview(file_path, model_path=None):
        if not file_path:
            return gr.update(value=None), ""
        try:
            name, data = uploads.take(file_path)
            from .imageio import load_image

            image = load_image(_named_bytes(name, data), max_side=1024)
        except DeepCovidError as exc:
            raise _user_error(exc) from None
        except Exception:
            log.exception("preview failed")
            raise gr.Error("unexpected error while reading the image (see the server log)",
                           print_exception=False) from None
        w, h = image.original_size
        info = f"{_md_escape(name)}: {image.source_format}, {image.bit_depth}-bit, {w}×{h} px"
        if image.notes:
            info += " — " + "; ".join(_md_escape(n) for n in image.notes)
        try:
            clahe = registry.entry(model_path).get("clahe")
        except DeepCovidError:
            clahe = None
        if clahe:  # what the model reads differs from what is shown: say so
            info += (f" — shown as decoded; this model equalises contrast (CLAHE, clip {_md_escape(clahe)}) "
                     "after resizing, before reading it")
        return as_png_image(image.to_uint8_rgb(), "preview"), info

    def on_model_change(model_path):
        try:
            entry = registry.entry(model_path)
        except DeepCovidError as exc:
            raise _user_error(exc) from None
        classes = list(entry.get("classes") or [])
        roc = find_roc_png(entry.get("run_dir"))
        roc_img = as_png_image(_read_png(roc), "ROC plot") if roc else None
        return (gr.update(choices=[PREDICTED] + classes, value=PREDICTED), model_card_markdown(entry),
                gr.update(value=roc_img, visible=roc_img is not None))

    def on_cam_change(method):
        return gr.update(value=f"*{SLOW_CAM_MESSAGE}*" if method == "scorecam" else "",
                         visible=method == "scorecam")

    roc0 = find_roc_png(default_entry.get("run_dir"))
    roc0_img = _read_png(roc0) if roc0 else None

    with gr.Blocks(title=TITLE, **PRIVACY["blocks"]) as demo:
        gr.Markdown(f"# {TITLE.split(' (')[0]}")
        if public_warning:
            gr.Markdown(PUBLIC_BANNER, elem_classes=["dc-banner"], elem_id="dc-banner")
        gr.Markdown(f"**{DISCLAIMER}**", elem_classes=["dc-disclaimer"], elem_id="dc-disclaimer")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                file_in = gr.File(label="Chest X-ray (DICOM, PNG 8/16-bit, JPEG, TIFF, BMP, WebP)",
                                  file_types=list(FILE_TYPES), type="filepath", file_count="single",
                                  elem_id="dc-upload", height=120)
                preview_img = gr.Image(label="Uploaded image (as decoded)", type="numpy",
                                       interactive=False, format="png", height=280, elem_id="dc-preview",
                                       buttons=["fullscreen"])
                preview_info = gr.Markdown("", elem_id="dc-preview-info")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[file_in], cache_examples=False,
                                label="Examples", examples_per_page=MAX_EXAMPLES,
                                example_labels=[Path(p).name for p in examples])
                model_dd = gr.Dropdown(choices=registry.choices(), value=registry.default_path, label="Model",
                                       info="every checkpoint found; the best validation F1 is preselected",
                                       elem_id="dc-model")
                with gr.Row():
                    cam_dd = gr.Dropdown(choices=cam_choices, value="gradcam", label="CAM method",
                                         elem_id="dc-cam")
                    target_dd = gr.Dropdown(choices=[PREDICTED] + default_classes, value=PREDICTED,
                                            label="Class to explain", elem_id="dc-target")
                slow_note = gr.Markdown("", visible=False)
                alpha_sl = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heat-map opacity", elem_id="dc-alpha")
                acts_cb = gr.Checkbox(value=False, label="Show activation maps", elem_id="dc-acts")
                run_btn = gr.Button("Analyse", variant="primary", elem_id="dc-run")
            with gr.Column(scale=3, min_width=360):
                decision_md = gr.Markdown("Upload an X-ray and press **Analyse**.", elem_id="dc-decision",
                                          elem_classes=["dc-decision"])
                label_out = gr.Label(label="Class probabilities", num_top_classes=10, elem_id="dc-label")
                with gr.Row():
                    overlay_out = gr.Image(label="Grad-CAM overlay", type="numpy", format="png",
                                           interactive=False, elem_id="dc-overlay", height=360,
                                           buttons=["download", "fullscreen"])
                    heatmap_out = gr.Image(label="Heat map", type="numpy", format="png", interactive=False,
                                           elem_id="dc-heatmap", height=360, buttons=["download", "fullscreen"])
                gallery_out = gr.Gallery(label="Activation maps (most active channels per layer)", columns=3,
                                         height=300, object_fit="contain", visible=False, format="png",
                                         buttons=["download", "fullscreen"],
                                         elem_id="dc-activations")
                with gr.Accordion("Model card", open=False, elem_id="dc-model-card"):
                    card_md = gr.Markdown(model_card_markdown(default_entry))
                    roc_out = gr.Image(value=roc0_img, label="ROC (validation)", type="numpy", interactive=False,
                                       visible=roc0_img is not None, format="png", height=320,
                                       buttons=["download", "fullscreen"])

        # API-only components (not shown): POST /predict
        with gr.Column(visible=False):
            api_file = gr.File(label="X-ray file", type="filepath")
            api_cam = gr.Dropdown(choices=list(CAM_METHODS), value="gradcam", label="cam_method")
            api_target = gr.Dropdown(choices=[PREDICTED] + default_classes, value=PREDICTED,
                                     allow_custom_value=True, label="target_class")
            api_label = gr.Textbox(label="label")
            api_probs = gr.JSON(label="probabilities")
            api_threshold = gr.Number(label="threshold")
            api_overlay = gr.Image(label="overlay", type="numpy", format="png", buttons=[])
            api_btn = gr.Button("predict")

        file_in.change(preview, inputs=[file_in, model_dd], outputs=[preview_img, preview_info], api_visibility="private",
                       show_progress="minimal")
        model_dd.change(on_model_change, inputs=model_dd, outputs=[target_dd, card_md, roc_out],
                        api_visibility="private", queue=False)
        cam_dd.change(on_cam_change, inputs=cam_dd, outputs=slow_note, api_visibility="private", queue=False)
        acts_cb.change(lambda v: gr.update(visible=bool(v)), inputs=acts_cb, outputs=gallery_out,
                       api_visibility="private", queue=False)
        run_btn.click(analyze, inputs=[file_in, model_dd, cam_dd, target_dd, alpha_sl, acts_cb],
                      outputs=[decision_md, label_out, overlay_out, heatmap_out, gallery_out],
                      api_visibility="private", concurrency_id="model")
        api_btn.click(api_predict, inputs=[api_file, api_cam, api_target],
                      outputs=[api_label, api_probs, api_threshold, api_overlay],
                      api_name="predict", concurrency_id="model")

    demo.queue(default_concurrency_limit=max(1, int(concurrency)), max_size=64)
    demo_ref["demo"] = demo
    demo.deepcovid = {"registry": registry, "uploads": uploads, "examples": examples}  # for tests/introspection
    return demo


# --------------------------------------------------------------------------------------------
# the subcommand


def run(args: argparse.Namespace) -> int:
    logins = resolve_auth(args)
    check_share(args, logins)
    max_size = parse_file_size(args.max_file_size)
    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    if args.examples_dir and not Path(args.examples_dir).is_dir():
        raise ConfigError(f"--examples-dir {args.examples_dir} is not a folder")
    created = prepare_environment()
    if created:
        atexit.register(shutil.rmtree, created, True)
    try:
        from .checkpoint import resolve_checkpoint

        weights = resolve_checkpoint(args.checkpoint, args.checkpoints_dir)
        registry = ModelRegistry.from_dir(args.checkpoints_dir, weights, device=args.device)
        registry.get(None)  # load the default model now: a broken checkpoint fails here, not on first use
        if args.share and not logins:
            print(SHARE_WITHOUT_AUTH_WARNING, file=sys.stderr)
        if args.host not in ("127.0.0.1", "localhost", "::1") and not logins:
            print(f"note: listening on {args.host} without a login; anyone on the network can use the page",
                  file=sys.stderr)
        demo = build_demo(checkpoints_dir=args.checkpoints_dir, examples_dir=args.examples_dir,
                          device=args.device, public_warning=bool(args.share and not logins),
                          concurrency=args.concurrency, registry=registry)
        entry = registry.entry(None)
        print(f"deepcovid: serving {_model_label(entry)} ({entry['path']}); "
              f"{len(registry.entries)} model(s) offered. {DISCLAIMER}")
        kw = launch_kwargs(args, logins)
        kw["max_file_size"] = max_size
        demo.launch(prevent_thread_lock=True, quiet=True, **kw)
        print(f"deepcovid: open {demo.local_url} in a browser"
              + (f" (public link: {demo.share_url})" if getattr(demo, "share_url", None) else "")
              + (" — login required" if logins else "") + ". Press Ctrl+C to stop.")
        try:
            demo.block_thread()
        finally:
            demo.close()
        return 0
    finally:
        if created:
            shutil.rmtree(created, ignore_errors=True)


def main(argv: list[str] | None = None, prog: str = "app.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve the deepcovid web page. " + DISCLAIMER)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except DeepCovidError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
