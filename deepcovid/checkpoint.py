"""Self-describing checkpoints: safetensors weights + plain-JSON metadata.

A run folder ``checkpoints/<run>/`` holds ``best.safetensors`` + ``best.json`` and
``last.safetensors`` + ``last.json``. The JSON is also embedded in the safetensors header (key
``deepcovid``), so the weights file alone rebuilds the model; the sidecar JSON adds the
weights' SHA-256, so an edited or swapped weights file is refused. Nothing is ever unpickled.

Writes are atomic: each file goes to a temporary name in the same folder, is fsynced, then
renamed over the old one. The weights are renamed before the JSON; a crash between the two
renames leaves a hash mismatch, which loading reports instead of using mismatched files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .errors import CheckpointError

FORMAT_VERSION = 1
METADATA_KEY = "deepcovid"
REQUIRED_KEYS = (
    "format_version", "arch", "classes", "positive_class", "num_outputs", "input_size", "mean", "std",
    "color_space", "threshold", "val_metrics", "epoch", "config", "versions", "data",
)
DEFAULT_CHECKPOINTS_DIR = "checkpoints"


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "deepcovid": __version__}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # not supported on every platform (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(run_dir: Path, name: str, state_dict: dict[str, torch.Tensor], meta: dict,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save ``<run_dir>/<name>.safetensors`` and ``<name>.json`` atomically; return the weights path.

    ``extra_tensors`` (e.g. optimizer state for ``last``) are stored under an ``extra.`` prefix.
    """
    from safetensors.torch import save

    missing = [k for k in REQUIRED_KEYS if k not in meta and k != "format_version"]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    meta = {**meta, "format_version": FORMAT_VERSION}
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().to("cpu").contiguous()
    blob = save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    run_dir = Path(run_dir)
    weights = run_dir / f"{name}.safetensors"
    sidecar = {**meta, "weights_file": weights.name, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_bytes(weights, blob)
    atomic_write_text(run_dir / f"{name}.json", json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return weights


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: dict
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor]

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def build_model(self):
        """Rebuild the model from the checkpoint alone (no download, random init then load)."""
        from .models import build_from_meta

        model = build_from_meta(self.meta)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: weights do not fit arch {self.meta['arch']!r}: {exc}") from exc
        model.eval()
        return model


def read_checkpoint(path: Path, *, verify_sidecar: bool = True) -> LoadedCheckpoint:
    """Read and validate a ``.safetensors`` checkpoint. Never executes code from the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    # safetensors framing: an 8-byte little-endian header length, then a JSON header. Only a
    # file without it is tested for pickle / torch.save magic (a header length whose low byte
    # is 0x80 is a valid safetensors file, not a pickle).
    framed = len(blob) >= 9 and blob[8:9] == b"{" and 8 + int.from_bytes(blob[:8], "little") <= len(blob)
    if not framed and (blob[:1] == b"\x80" or blob[:2] == b"PK"):
        raise CheckpointError(
            f"{path} is a pickle/torch.save file, not safetensors; deepcovid refuses to unpickle checkpoints "
            "because unpickling can run arbitrary code"
        )
    try:
        tensors = load(blob)
        from safetensors import safe_open  # header metadata without a second parse of tensors

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, ValueError, OSError, Exception) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint (corrupt or truncated?): {exc}") from exc
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path} is a safetensors file but not a deepcovid checkpoint (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON: {exc}") from exc
    fv = meta.get("format_version")
    if not isinstance(fv, int) or fv > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {fv!r}; this deepcovid ({__version__}) reads up to {FORMAT_VERSION}. "
            "Upgrade deepcovid to load it."
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint metadata lacks {missing}")
    sidecar_path = path.with_suffix(".json")
    if verify_sidecar and sidecar_path.is_file():
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{sidecar_path} is not valid JSON: {exc}") from exc
        expected = sidecar.get("weights_sha256")
        actual = hashlib.sha256(blob).hexdigest()
        if expected and expected != actual:
            raise CheckpointError(
                f"{path} does not match the SHA-256 recorded in {sidecar_path.name}: the weights were modified, "
                "replaced, or a save was interrupted. Retrain, or use the run's other checkpoint."
            )
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    if not model_sd:
        raise CheckpointError(f"{path} holds no model weights")
    return LoadedCheckpoint(path=path, meta=meta, state_dict=model_sd, extra=extra)


def list_checkpoints(checkpoints_dir: Path = Path(DEFAULT_CHECKPOINTS_DIR), name: str = "best") -> list[dict]:
    """Every ``<name>.json`` under ``checkpoints_dir`` (recursively), best validation F1 first.

    Reads only the small JSON sidecars; entries that cannot be parsed are skipped.
    """
    root = Path(checkpoints_dir)
    out = []
    if not root.is_dir():
        return out
    for js in sorted(root.rglob(f"{name}.json")):
        if "members" in js.relative_to(root).parts[:-1]:
            continue  # an ensemble's members: 'best' is the ensemble that holds them
        try:
            meta = json.loads(js.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        weights = js.with_name(meta.get("weights_file", f"{name}.safetensors"))
        if not weights.is_file() or "arch" not in meta:
            continue
        vm = meta.get("val_metrics") or {}
        out.append({**meta, "path": str(weights), "run_dir": str(js.parent),
                    "_f1": float(vm.get("f1", float("-inf"))), "_loss": float(vm.get("loss", float("inf")))})
    out.sort(key=lambda m: (-m["_f1"], m["_loss"], m["path"]))
    return out


def resolve_checkpoint(spec: str | os.PathLike, checkpoints_dir: str | os.PathLike = DEFAULT_CHECKPOINTS_DIR) -> Path:
    """``spec``: a ``.safetensors`` file, a run folder (its ``best``), or ``best`` (highest val F1)."""
    s = str(spec)
    if s == "best":
        found = list_checkpoints(Path(checkpoints_dir))
        if not found:
            raise CheckpointError(
                f"no checkpoint found under {checkpoints_dir!s}/. Train one first, for example:\n"
                f"  deepcovid train --data ../shared/data/chest_xray --preset cpu-fast --output {checkpoints_dir!s}"
            )
        return Path(found[0]["path"])
    p = Path(s).expanduser()
    if p.is_dir():
        for candidate in (p / "best.safetensors", p / "last.safetensors"):
            if candidate.is_file():
                return candidate
        nested = list_checkpoints(p)
        if nested:
            return Path(nested[0]["path"])
        raise CheckpointError(f"{p} holds no best.safetensors or last.safetensors")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist (give a .safetensors file, a run folder, or 'best')")
    return p


def load_checkpoint(spec: str | os.PathLike, checkpoints_dir: str | os.PathLike = DEFAULT_CHECKPOINTS_DIR) -> LoadedCheckpoint:
    return read_checkpoint(resolve_checkpoint(spec, checkpoints_dir))
