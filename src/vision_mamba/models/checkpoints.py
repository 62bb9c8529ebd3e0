"""Loading official Vim checkpoints and safetensors into VisionMamba: unwrapping, pos-embed resizing, head handling."""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "LoadReport",
    "load_pretrained",
    "load_safetensors",
    "save_safetensors",
    "check_checkpoint_file",
    "checkpoint_filter_fn",
    "load_checkpoint",
    "read_state_dict",
    "resize_pos_embed",
]

HEAD_KEYS = ("head.weight", "head.bias")


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or does not fit the model (the message names the file and the problem)."""

    user_error = True  # printed without a traceback by the entry points


@dataclass
class LoadReport:
    """What load_pretrained did: keys left at their init, head dropped, pos_embed resized."""

    path: str
    missing: list[str] = field(default_factory=list)
    dropped_head: bool = False
    resized_pos_embed: tuple[tuple[int, int], tuple[int, int]] | None = None


# --------------------------------------------------------------------------------------------------------------------
# pos_embed with the class token in the middle
# --------------------------------------------------------------------------------------------------------------------


def resize_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_cls: int = 1
) -> torch.Tensor:
    """Resize a (1, M + num_cls, C) position embedding whose class token sits in the middle (index M // 2).

    The class-token row is split out, the (old_h, old_w) grid is resized bicubically (align_corners=False, in
    float32), and the class row is reinserted at the middle of the new grid (index M' // 2).
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    old_m = old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != old_m + num_cls:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} rows; a {old_grid} grid needs {old_m + num_cls}")
    mid = old_m // 2
    if num_cls:
        cls, grid = pos_embed[:, mid : mid + 1], torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1 :]], dim=1)
    else:
        cls, grid = pos_embed[:, :0], pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    new_mid = new_grid[0] * new_grid[1] // 2
    return torch.cat([grid[:, :new_mid], cls, grid[:, new_mid:]], dim=1)


def _grid_of(num_patches: int, model_grid: tuple[int, int]) -> tuple[int, int]:
    """The patch grid a stored pos_embed was trained on: the model's own if the count matches, else a square."""
    if num_patches == model_grid[0] * model_grid[1]:
        return model_grid
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"cannot infer the patch grid of a pos_embed with {num_patches} patch rows (not square)")
    return side, side


# --------------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------------


# Types a checkpoint may hold besides tensors and plain containers. The official Vim/DeiT training checkpoints
# pickle their argparse.Namespace; nothing here can run code when it is unpickled.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
TASK_NET_PREFIX = "net."  # the task (tasks/base.py) holds the model as `net`
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
_PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2 (torch's legacy format and plain pickles)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a torch checkpoint with ``weights_only=True`` and the short SAFE_GLOBALS allow-list.

    The file is checked before anything is unpickled (check_checkpoint_file); a file that needs any other type,
    or is empty, truncated, a folder or not a checkpoint, raises CheckpointError with one line naming the problem.
    """
    path = Path(path)
    check_checkpoint_file(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported GLOBAL:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        name = found.group(1) if found else _first_global(path.read_bytes())
        raise CheckpointError(_refusal(path, name or "pickle instructions that weights_only loading refuses")) from None
    except Exception as e:  # torch.load raises many types on damaged bytes (RuntimeError, KeyError, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or damaged?) ({_short(e)})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint (a dict of tensors and values)")
    return obj


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Refuse, without unpickling anything, what load_checkpoint cannot load: a missing file, a folder, an empty,
    text, truncated or foreign file, or a checkpoint that holds a type outside SAFE_GLOBALS (named in the error).

    Reads only the file's head and, for torch's zip format, its small pickle record (never the tensors), so entry
    points call it before building anything. Files in torch's legacy format (a bare pickle) are refused by
    load_checkpoint's weights_only unpickler instead, the first class or function it refuses named.
    """
    path = Path(path)
    if path.is_dir():
        hint = path / "checkpoints" / "last.ckpt"
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file" + (f" (did you mean {hint}?)" if hint.is_file() else ""))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: empty (0 bytes; its write never finished?)")
    if head.startswith(_ZIP_MAGIC):
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                refused = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except pickle.UnpicklingError:  # instructions torch.save never writes (pickle protocol > 2): crafted
            refused = [_first_global(_pickle_record(path)) or "pickle instructions that torch.save never writes"]
        except Exception as e:  # the zip reader finds no archive directory at the end of the file
            raise CheckpointError(
                f"{path}: not a readable torch checkpoint: truncated or damaged ({path.stat().st_size} bytes, no "
                "complete zip directory; an interrupted copy or save?): use another checkpoint"
            ) from e
        if refused:
            # name a type of its own first: builtins/typing/collections entries come with pickled objects
            refused.sort(key=lambda name: (name.split(".")[0] in ("builtins", "typing", "collections"), name))
            others = f" (and {len(refused) - 1} other types)" if len(refused) > 1 else ""
            raise CheckpointError(_refusal(path, refused[0] + others))
    elif not head.startswith(_PICKLE_MAGIC):
        line = _text_line(head)
        what = f"a text file (it begins {line!r})" if line else f"an unknown format (it begins {head[:8]!r})"
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {what}; give a .ckpt written by train.py "
                              "or an official .pth")


def _text_line(head: bytes) -> str | None:
    """The first line of a file that begins like text, else None."""
    text = head.decode("utf-8", errors="ignore")
    if not text.strip() or any(not (c.isprintable() or c in "\r\n\t") for c in text):
        return None
    return text.strip().splitlines()[0][:40]


def _refusal(path: Path, global_name: str) -> str:
    allowed = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS)
    return (
        f"{path}: holds {global_name}; only tensors, plain containers and {allowed} are loaded (torch.load "
        "weights_only=True): unpickling anything else could run code, so this file is refused"
    )


def _pickle_record(path: Path) -> bytes:
    """The pickle inside a torch zip checkpoint (``<name>/data.pkl``)."""
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))


def _first_global(data: bytes) -> str | None:
    """The first class/function a pickle refers to, found by parsing its instructions (nothing runs).

    GLOBAL and INST name it in their argument; STACK_GLOBAL takes module and name from the stack: the last two
    strings pushed, directly or fetched from the memo, so every memo slot is followed (a slot holding no string too).
    """
    strings: list[str] = []
    memo: dict[int, str | None] = {}
    top: str | None = None  # what the last instruction pushed, if a string
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            if op.name == "MEMOIZE":
                memo[len(memo)] = top
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = top
            elif op.stack_after:  # an instruction that pushes a value (FRAME, PROTO and the like push nothing)
                fetched = op.name in ("BINGET", "LONG_BINGET", "GET")
                top = memo.get(arg) if fetched else arg if "UNICODE" in op.name or "STRING" in op.name else None
                if top is not None:
                    strings.append(top)
    except Exception:  # a damaged pickle: no name to give
        return None
    return None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) < 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _unwrap(obj, path) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint: official {'model': sd, ...}, {'state_dict': sd} or a plain sd.

    A Lightning checkpoint of this project holds the whole task's state; the model is its ``net.`` part.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or a training checkpoint")
    lightning = "pytorch-lightning_version" in obj
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if lightning:
        obj = {k.removeprefix(TASK_NET_PREFIX): v for k, v in obj.items() if k.startswith(TASK_NET_PREFIX)}
    if not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: no state dict found (top-level keys: {sorted(map(str, obj))[:8]})")
    prefix = "module."  # DDP-wrapped saves
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the model weights from a .safetensors file or a torch checkpoint (through load_checkpoint: weights_only).

    A training checkpoint of this project (``<run>/checkpoints/*.ckpt``) gives its ``net.`` weights -- the weights
    the run validated as ``val/acc1`` and picked its best checkpoint by -- not its EMA copy; official checkpoints
    likewise give ``model`` before ``model_ema``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path), device="cpu"), path)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated/foreign files
            raise CheckpointError(f"{path}: not a readable safetensors file ({_short(e)})") from e
    return _unwrap(load_checkpoint(path), path)


# --------------------------------------------------------------------------------------------------------------------
# Fitting a state dict to a model
# --------------------------------------------------------------------------------------------------------------------


def _model_grid(model: nn.Module) -> tuple[int, int]:
    return tuple(model.patch_embed.grid_size)


def _fit(state_dict: dict[str, torch.Tensor], model: nn.Module, strict_head: bool, path: str):
    """Resize pos_embed and drop a head that does not fit. Returns (state_dict, dropped_head, resized)."""
    sd = dict(state_dict)
    resized = None
    pe = sd.get("pos_embed")
    if pe is not None and hasattr(model, "pos_embed") and pe.shape != model.pos_embed.shape:
        if pe.ndim != 3 or pe.shape[-1] != model.pos_embed.shape[-1]:
            raise CheckpointError(
                f"{path}: pos_embed {tuple(pe.shape)} does not fit the model's "
                f"{tuple(model.pos_embed.shape)} (different embed_dim?)"
            )
        new_grid = _model_grid(model)
        try:
            old_grid = _grid_of(pe.shape[1] - 1, new_grid)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
        sd["pos_embed"] = resize_pos_embed(pe, old_grid, new_grid)
        resized = (old_grid, new_grid)
    own = model.state_dict()
    dropped = False
    if any(k in sd for k in HEAD_KEYS):
        fits = all(k in own and k in sd and sd[k].shape == own[k].shape for k in HEAD_KEYS)
        if not fits:
            if strict_head:
                got = tuple(sd["head.weight"].shape) if "head.weight" in sd else None
                raise CheckpointError(
                    f"{path}: head {got} does not fit the model (num_classes="
                    f"{getattr(model, 'num_classes', '?')}) and strict_head=True"
                )
            for k in HEAD_KEYS:
                sd.pop(k, None)
            dropped = True
    return sd, dropped, resized


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's pretrained_filter_fn: unwrap an official checkpoint, resize pos_embed, drop a head that does not fit."""
    if not (state_dict and all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        state_dict = _unwrap(state_dict, "<state dict>")
    elif all(k.startswith("module.") for k in state_dict):
        state_dict = _unwrap(state_dict, "<state dict>")
    return _fit(state_dict, model, strict_head=False, path="<state dict>")[0]


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, strict_head: bool = False, strict_backbone: bool = True
) -> LoadReport:
    """Load local weights (official training checkpoint, plain state dict or .safetensors) into `model`.

    pos_embed is resized when the patch grid differs; the head is dropped (left at its init) when the class count
    differs, unless strict_head. Unexpected keys and backbone shape mismatches always raise CheckpointError;
    missing backbone keys raise too unless strict_backbone=False (e.g. a `cross` model started from a
    `bidirectional` checkpoint, whose extra routes keep their init) -- they are logged either way.
    """
    path = str(path)
    sd, dropped, resized = _fit(read_state_dict(path), model, strict_head, path)
    own = model.state_dict()
    unexpected = sorted(k for k in sd if k not in own)
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} keys the model does not have (foreign or other-variant "
            f"checkpoint?), e.g. {unexpected[:5]}"
        )
    bad = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} shapes do not fit (other variant?), e.g. {bad[:3]}")
    missing = sorted(k for k in own if k not in sd)
    backbone_missing = [k for k in missing if k not in HEAD_KEYS]
    if backbone_missing:
        msg = f"{path}: {len(backbone_missing)} backbone keys missing, e.g. {backbone_missing[:5]}"
        if strict_backbone:
            raise CheckpointError(msg)
        log.warning("%s (left at their init)", msg)
    model.load_state_dict(sd, strict=False)
    if dropped:
        log.info("%s: head does not fit num_classes=%s; left at its init", path, getattr(model, "num_classes", "?"))
    if resized:
        log.info("%s: pos_embed resized from grid %s to %s", path, *resized)
    return LoadReport(path, missing, dropped, resized)


def save_safetensors(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the model's persistent state dict to a .safetensors file (atomically: temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_safetensors(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a file written by save_safetensors into a model of the same variant (the head must fit)."""
    return load_pretrained(model, path, strict_head=True)
