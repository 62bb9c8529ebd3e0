"""Checkpoints: official training-checkpoint layout, safetensors, pos-embed resizing, heads and clear file errors."""

from __future__ import annotations

import argparse
import io
import logging
import os
import pathlib
import pickle
import zipfile

import pytest
import timm
import torch

from vision_mamba.models.checkpoints import (
    CheckpointError,
    _first_global,
    _refusal,
    check_checkpoint_file,
    checkpoint_filter_fn,
    load_checkpoint,
    load_pretrained,
    load_safetensors,
    read_state_dict,
    resize_pos_embed,
    save_safetensors,
)
from vision_mamba.models.vim import VisionMamba


def small(**kwargs) -> VisionMamba:
    """16px patches like the real variants (2x2 grid at 32, 4x4 at 64), embed 32, depth 2."""
    args = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_classes=5, scan_backend="torch")
    return VisionMamba(**{**args, **kwargs}).eval()


def save_official(model, path, **extra):
    """The layout of hustvl/Vim's released files: a DeiT training checkpoint pickled with an argparse.Namespace."""
    sd = model.state_dict()
    args = argparse.Namespace(model="vim_tiny_patch16_224", lr=5e-4, input_size=224)
    torch.save({"model": sd, "model_ema": sd, "optimizer": {}, "epoch": 299, "args": args, **extra}, path)


def test_official_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = small()
    save_official(src, tmp_path / "vim_t.pth")
    dst = small()
    report = load_pretrained(dst, tmp_path / "vim_t.pth")
    assert report.missing == [] and not report.dropped_head and report.resized_pos_embed is None
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_pretrained_path_through_timm(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vim_digits", depth=2, scan_backend="torch")
    save_official(src, tmp_path / "digits.pth")
    dst = timm.create_model("vim_digits", depth=2, scan_backend="torch", pretrained_path=str(tmp_path / "digits.pth"))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    src = small(scan="cross")
    save_safetensors(src, tmp_path / "w.safetensors")
    dst = small(scan="cross")
    load_safetensors(dst, tmp_path / "w.safetensors")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))


def test_resize_pos_embed_keeps_the_class_token_in_the_middle():
    pe = torch.randn(1, 14 * 14 + 1, 8)
    out = resize_pos_embed(pe, (14, 14), (28, 20))
    assert out.shape == (1, 28 * 20 + 1, 8)
    torch.testing.assert_close(out[:, 28 * 20 // 2], pe[:, 14 * 14 // 2])
    assert resize_pos_embed(pe, (14, 14), (14, 14)) is pe
    # a grid resized to itself through another size keeps its class row and roughly its values
    back = resize_pos_embed(resize_pos_embed(pe, (14, 14), (28, 28)), (28, 28), (14, 14))
    torch.testing.assert_close(back[:, 98], pe[:, 98])


def test_weights_from_a_smaller_grid_load_and_run_at_a_larger_one(tmp_path):
    torch.manual_seed(0)
    src = small()
    save_official(src, tmp_path / "w.pth")
    big = small(img_size=64)
    report = load_pretrained(big, tmp_path / "w.pth")
    assert report.resized_pos_embed == ((2, 2), (4, 4))
    torch.testing.assert_close(big.pos_embed[:, 8], src.pos_embed[:, 2])  # the class row, middle of both
    out = big(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out).all()
    # and the same weights at run time: the forward resizes pos_embed itself
    assert torch.isfinite(src(torch.randn(1, 3, 64, 96))).all()


def test_head_is_dropped_when_the_class_count_differs(tmp_path, caplog):
    torch.manual_seed(0)
    src = small()
    save_official(src, tmp_path / "w.pth")
    dst = small(num_classes=3)
    head = dst.head.weight.clone()
    with caplog.at_level(logging.INFO):
        report = load_pretrained(dst, tmp_path / "w.pth")
    assert report.dropped_head and report.missing == ["head.bias", "head.weight"]
    assert torch.equal(dst.head.weight, head) and "head" in caplog.text
    torch.testing.assert_close(dst.norm_f.weight, src.norm_f.weight)
    with pytest.raises(CheckpointError, match="strict_head"):
        load_pretrained(small(num_classes=3), tmp_path / "w.pth", strict_head=True)


def test_cross_model_from_a_bidirectional_checkpoint_needs_consent(tmp_path):
    save_official(small(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="backbone keys missing"):
        load_pretrained(small(scan="cross"), tmp_path / "w.pth")
    report = load_pretrained(small(scan="cross"), tmp_path / "w.pth", strict_backbone=False)
    assert "layers.0.mixer.A_c_log" in report.missing


def test_other_variant_is_a_clear_error(tmp_path):
    save_official(small(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"w\.pth: .*(do|does) not fit"):
        load_pretrained(small(embed_dim=48), tmp_path / "w.pth")


def test_truncated_file_is_a_clear_error(tmp_path):
    save_official(small(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable torch checkpoint"):
        load_pretrained(small(), tmp_path / "cut.pth")
    save_safetensors(small(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_pretrained(small(), tmp_path / "cut.safetensors")


def test_foreign_files_are_clear_errors(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a readable torch checkpoint"):
        load_pretrained(small(), tmp_path / "notes.pth")
    torch.save({"conv1.weight": torch.zeros(2), "fc.weight": torch.zeros(2)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"resnet\.pth: 2 keys the model does not have.*conv1.weight"):
        load_pretrained(small(), tmp_path / "resnet.pth")
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match=r"meta\.pth: no state dict found"):
        read_state_dict(tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match=r"nowhere\.pth: no such file"):
        load_pretrained(small(), tmp_path / "nowhere.pth")


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"model": small().state_dict(), "path": pathlib.PurePosixPath("x")}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match=r"pickled\.pth: holds pathlib.PurePosixPath; only tensors"):
        load_pretrained(small(), tmp_path / "pickled.pth")


def test_checkpoint_filter_fn_unwraps_resizes_and_drops_the_head():
    src = small()
    ckpt = {"model": {"module." + k: v for k, v in src.state_dict().items()}, "args": argparse.Namespace()}
    out = checkpoint_filter_fn(ckpt, small(img_size=64, num_classes=3))
    assert out["pos_embed"].shape == (1, 17, 32) and "head.weight" not in out
    assert "layers.1.mixer.A_b_log" in out


def test_checkpoint_filter_fn_takes_a_plain_or_ddp_state_dict_and_names_the_state_dict_in_errors():
    src = small()
    plain = src.state_dict()
    ddp = {"module." + k: v for k, v in plain.items()}  # tensors only: the second branch strips the prefix
    for given in (plain, ddp):
        out = checkpoint_filter_fn(given, small())
        assert out.keys() == plain.keys() and all(torch.equal(out[k], plain[k]) for k in plain)
    with pytest.raises(CheckpointError, match=r"^<state dict>: no state dict found \(top-level keys: \['epoch'\]\)$"):
        checkpoint_filter_fn({"epoch": 3}, small())
    with pytest.raises(CheckpointError, match=r"^<state dict>: holds a list, not a state dict or a training checkpoint$"):
        checkpoint_filter_fn([], small())
    with pytest.raises(CheckpointError, match=r"^<state dict>: pos_embed \(1, 5, 32\) does not fit"):
        checkpoint_filter_fn({**plain, "pos_embed": torch.zeros(1, 5, 32)}, small(embed_dim=48))


def test_grid_of_a_stored_pos_embed_is_square_or_an_error():
    from vision_mamba.models.checkpoints import _grid_of

    assert _grid_of(6, (2, 3)) == (2, 3)  # the model's own (non-square) grid
    assert _grid_of(16, (2, 3)) == (4, 4)
    with pytest.raises(ValueError, match=r"^cannot infer the patch grid of a pos_embed with 12 patch rows"):
        _grid_of(12, (2, 3))


def test_error_text_helpers():
    from vision_mamba.models.checkpoints import _refusal, _short, _text_line

    assert _short(ValueError("")) == "ValueError"
    assert _short(ValueError("  first line\nsecond")) == "ValueError: first line"
    assert _short(KeyError("k" * 159)) == "KeyError: '" + "k" * 156 + "..."  # str(KeyError) adds quotes: 161
    assert _short(ValueError("v" * 159)) == "ValueError: " + "v" * 159
    assert _short(ValueError("v" * 160)) == "ValueError: " + "v" * 157 + "..."
    assert _text_line(b"not a checkpoint\nsecond line") == "not a checkpoint"
    assert _text_line(b"  " + b"x" * 50) == "x" * 40
    assert _text_line(b"caf\xc3\xa9 \xff au lait") == "café  au lait"  # undecodable bytes are dropped
    assert _text_line(b" \n\t ") is None and _text_line(b"ab\x00cd") is None
    assert _refusal(pathlib.Path("w.pth"), "os.system") == (
        "w.pth: holds os.system; only tensors, plain containers and argparse.Namespace are loaded (torch.load "
        "weights_only=True): unpickling anything else could run code, so this file is refused")


def test_safetensors_need_the_head_to_fit_and_are_written_atomically_with_their_format(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "new" / "deeper" / "w.safetensors"
    save_safetensors(small(), path, metadata={"variant": "small"})
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]  # no temporary file left
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "variant": "small"}
    with pytest.raises(CheckpointError, match="head"):
        load_safetensors(small(num_classes=3), path)


def test_a_failed_safetensors_write_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    written = []

    def disk_full(sd, filename, metadata=None):
        written.append(pathlib.Path(filename))
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_safetensors(small(), tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []
    # the temporary file sits beside the target (os.replace is atomic only within one file system), hidden
    (tmp,) = written
    assert tmp.parent == tmp_path and tmp.name.startswith(".w.safetensors.") and tmp.name.endswith(".tmp")


# ---- hostile pickles: refused, and the global they would call is named ----------------------------------------------


def globals_called(data: bytes) -> list[str]:
    """The globals Python's own unpickler looks up for `data`, in order; each resolves to a no-op (nothing runs)."""
    found = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.append(f"{module}.{name}")
            return lambda *args: None

    Recorder(io.BytesIO(data)).load()
    return found


def op(code: bytes, *args: bytes) -> bytes:
    return code + b"".join(args)


def text(s: str) -> bytes:  # a str pushed the way protocol 4 writes it
    return op(pickle.SHORT_BINUNICODE, bytes([len(s)]), s.encode())


# Crafted pickles: the module and name of STACK_GLOBAL pushed as strings of every kind, or fetched back from the memo
# through every kind of memo slot, after decoy strings that a parser keeping no memo (or miscounting its slots) would
# name instead. Each calls posix.system('true') when unpickled without weights_only.
PROTO2, CALL = op(pickle.PROTO, b"\x02"), op(pickle.STACK_GLOBAL) + text("true") + op(pickle.TUPLE1, pickle.REDUCE, pickle.STOP)
CRAFTED = {
    "GLOBAL": PROTO2 + op(pickle.GLOBAL, b"posix\nsystem\n") + text("true") + op(pickle.TUPLE1, pickle.REDUCE, pickle.STOP),
    "INST": PROTO2 + op(pickle.MARK) + text("true") + op(pickle.INST, b"posix\nsystem\n", pickle.STOP),
    "exactly two strings": PROTO2 + text("posix") + text("system") + CALL,
    "MEMOIZE after a dict": PROTO2 + op(pickle.EMPTY_DICT, pickle.MEMOIZE, pickle.POP) + text("posix")
    + op(pickle.MEMOIZE, pickle.POP) + text("system") + op(pickle.MEMOIZE, pickle.POP) + text("a") + text("b")
    + op(pickle.POP, pickle.POP, pickle.BINGET, b"\x01", pickle.BINGET, b"\x02") + CALL,
    "BINPUT": PROTO2 + text("posix") + op(pickle.BINPUT, b"\x07", pickle.POP) + text("system")
    + op(pickle.BINPUT, b"\x08", pickle.POP) + text("a") + text("b") + op(pickle.POP, pickle.POP)
    + op(pickle.BINGET, b"\x07", pickle.BINGET, b"\x08") + CALL,
    "LONG_BINPUT": PROTO2 + text("posix") + op(pickle.LONG_BINPUT, (300).to_bytes(4, "little"), pickle.POP)
    + text("system") + op(pickle.LONG_BINPUT, (301).to_bytes(4, "little"), pickle.POP) + text("a") + text("b")
    + op(pickle.POP, pickle.POP, pickle.LONG_BINGET, (300).to_bytes(4, "little"))
    + op(pickle.LONG_BINGET, (301).to_bytes(4, "little")) + CALL,
    "PUT": PROTO2 + op(pickle.UNICODE, b"posix\n", pickle.PUT, b"5\n", pickle.POP, pickle.UNICODE, b"system\n")
    + op(pickle.PUT, b"6\n", pickle.POP) + text("a") + text("b") + op(pickle.POP, pickle.POP, pickle.GET, b"5\n")
    + op(pickle.GET, b"6\n") + CALL,
    "py2 strings": PROTO2 + text("a") + text("b") + op(pickle.POP, pickle.POP) + op(pickle.SHORT_BINSTRING, b"\x05posix")
    + op(pickle.BINSTRING, (6).to_bytes(4, "little"), b"system") + CALL,
    "a memo slot holding no string": PROTO2 + text("a") + op(pickle.BINPUT, b"\x00", pickle.EMPTY_DICT, pickle.BINPUT)
    + b"\x01" + op(pickle.POP, pickle.POP) + text("posix") + op(pickle.BINGET, b"\x01", pickle.POP) + text("system")
    + op(pickle.FRAME, (0).to_bytes(8, "little")) + CALL,
    "a number pushed and popped between the name and the call": PROTO2 + text("posix") + text("system")
    + op(pickle.BININT1, b"\x05", pickle.POP) + CALL,
}


@pytest.mark.parametrize("kind", CRAFTED)
def test_the_first_global_of_a_crafted_pickle_is_named(kind, tmp_path):
    data = CRAFTED[kind]
    assert globals_called(data) == ["posix.system"]  # what a plain torch.load would run
    assert _first_global(data) == "posix.system"
    (tmp_path / "crafted.pth").write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "crafted.pth")
    assert str(info.value) == _refusal(tmp_path / "crafted.pth", "posix.system")


def test_pickles_of_every_protocol_are_refused_naming_the_global(tmp_path):
    class SystemCall:
        def __reduce__(self):
            return os.system, ("true",)

    # strings equal to the module and the name come first: protocol 4 and 5 then fetch both from the memo
    obj = {"model": {}, os.system.__module__: 0, "system": 1, "x": SystemCall()}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(obj, protocol=protocol)
        expected = globals_called(data)[0]
        assert expected == f"{os.system.__module__}.system"
        path = tmp_path / f"protocol{protocol}.pth"
        path.write_bytes(data if data.startswith(b"\x80") else PROTO2 + data)  # protocols 0, 1 have no header
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value) == _refusal(path, expected), protocol


def test_a_torch_archive_with_a_crafted_pickle_record_is_refused_naming_the_global(tmp_path):
    # torch.save writes protocol 2, which torch's own check reads; a record of protocol 4 only the fallback parser
    archive = io.BytesIO()
    torch.save({"w": torch.ones(2)}, archive)
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(tmp_path / "crafted.pt", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, CRAFTED["MEMOIZE after a dict"] if name.endswith("/data.pkl") else src.read(name))
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_file(tmp_path / "crafted.pt")
    assert str(info.value) == _refusal(tmp_path / "crafted.pt", "posix.system")


def test_a_torch_archive_whose_record_has_no_global_says_what_torch_save_never_writes(tmp_path):
    archive = io.BytesIO()
    torch.save({"w": torch.ones(2)}, archive)
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(tmp_path / "odd.pt", "w") as dst:
        for name in src.namelist():  # a protocol-4 record (FRAME, MEMOIZE) naming no global
            dst.writestr(name, pickle.dumps({"w": 1}, protocol=4) if name.endswith("/data.pkl") else src.read(name))
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_file(tmp_path / "odd.pt")
    assert str(info.value) == _refusal(tmp_path / "odd.pt", "pickle instructions that torch.save never writes")


def test_an_empty_file_is_refused_as_a_write_that_never_finished(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_file(tmp_path / "empty.ckpt")
    assert str(info.value) == (f"{tmp_path / 'empty.ckpt'}: not a readable torch checkpoint: empty (0 bytes; its "
                               "write never finished?)")


def test_a_pickle_without_a_global_or_damaged_gives_no_name():
    assert _first_global(pickle.dumps({"a": ["posix", "system"]}, protocol=4)) is None
    whole = CRAFTED["exactly two strings"]
    assert _first_global(whole[: whole.index(pickle.STACK_GLOBAL)]) is None  # cut off before STACK_GLOBAL
    assert _first_global(b"\x80\x02\xff") is None  # not an instruction


# ---- where the weights are found, and what a load that does not fit says ------------------------------------------


def test_the_model_weights_are_found_in_every_checkpoint_layout(tmp_path):
    sd = {"a.weight": torch.ones(2), "b.bias": torch.zeros(3)}
    layouts = {
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model_ema only": {"model_ema": sd, "epoch": 3},
        # a Lightning checkpoint of this project: the task's `net.` weights, not its EMA copy or other modules
        "lightning": {"pytorch-lightning_version": "2.6", "state_dict": {
            **{"net." + k: v for k, v in sd.items()}, "ema.module.a.weight": torch.full((2,), 7.0), "loss.w": torch.ones(1)}},
    }
    for name, ckpt in layouts.items():
        torch.save(ckpt, tmp_path / "w.pth")
        got = read_state_dict(tmp_path / "w.pth")
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name
    torch.save({f"k{i}": i for i in range(10)}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "meta.pth")
    keys = sorted(f"k{i}" for i in range(10))[:8]  # the first eight, sorted
    assert str(info.value) == f"{tmp_path / 'meta.pth'}: no state dict found (top-level keys: {keys})"


def test_safetensors_files_that_cannot_be_read_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "nowhere.safetensors")
    assert str(info.value) == f"{tmp_path / 'nowhere.safetensors'}: no such file"
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "empty.safetensors")
    assert str(info.value) == f"{tmp_path / 'empty.safetensors'}: no state dict found (top-level keys: [])"
    save_file({"w": torch.ones(64)}, tmp_path / "w.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:100])
    with pytest.raises(Exception) as raised:  # what safetensors itself says of the file
        load_file(tmp_path / "cut.safetensors")
    reason = f"{type(raised.value).__name__}: {str(raised.value).splitlines()[0]}"
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "cut.safetensors")
    assert str(info.value) == f"{tmp_path / 'cut.safetensors'}: not a readable safetensors file ({reason})"


class Plain(torch.nn.Module):
    """Any model: `layers` bias-free square linears of `width`, and a head of `classes` (no num_classes attribute)."""

    def __init__(self, width: int = 4, layers: int = 4, classes: int = 3):
        super().__init__()
        self.body = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
        self.head = torch.nn.Linear(width, classes)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vision_mamba.models.checkpoints"]


def test_a_head_that_does_not_fit_is_named_or_dropped(tmp_path, caplog):
    path = tmp_path / "w.pth"
    save_official(small(), path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(small(num_classes=3), path, strict_head=True)
    assert str(info.value) == f"{path}: head (5, 32) does not fit the model (num_classes=3) and strict_head=True"
    with caplog.at_level(logging.INFO):
        report = load_pretrained(small(num_classes=3), path)
    assert messages(caplog) == [f"{path}: head does not fit num_classes=3; left at its init"]
    assert report.path == str(path) and report.dropped_head is True
    assert load_pretrained(small(), path).dropped_head is False
    # a checkpoint with only one of the head's tensors: dropped (never half loaded), and named in strict mode
    torch.save({"model": {k: v for k, v in small().state_dict().items() if k != "head.weight"}}, path)
    assert load_pretrained(small(), path).missing == ["head.bias", "head.weight"]
    with pytest.raises(CheckpointError, match=r"w\.pth: head None does not fit the model \(num_classes=5\)"):
        load_pretrained(small(), path, strict_head=True)
    torch.save({"model": {k: v for k, v in small().state_dict().items() if k != "head.bias"}}, path)
    assert load_pretrained(small(), path).dropped_head is True
    # a model without num_classes
    torch.save(Plain(classes=3).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(Plain(classes=2), path, strict_head=True)
    assert str(info.value) == f"{path}: head (3, 4) does not fit the model (num_classes=?) and strict_head=True"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_pretrained(Plain(classes=2), path)
    assert messages(caplog) == [f"{path}: head does not fit num_classes=?; left at its init"]


def test_a_resized_pos_embed_is_logged_and_an_unknown_grid_is_named(tmp_path, caplog):
    path = tmp_path / "w.pth"
    save_official(small(), path)
    with caplog.at_level(logging.INFO):
        load_pretrained(small(img_size=64), path)
    assert messages(caplog) == [f"{path}: pos_embed resized from grid (2, 2) to (4, 4)"]
    torch.save({"model": {**small().state_dict(), "pos_embed": torch.zeros(1, 7, 32)}}, path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(small(), path)
    assert str(info.value) == f"{path}: cannot infer the patch grid of a pos_embed with 6 patch rows (not square)"


def test_keys_and_shapes_that_do_not_fit_are_listed_in_short(tmp_path, caplog):
    path = tmp_path / "w.pth"
    torch.save({**Plain().state_dict(), **{f"extra{i}": torch.zeros(1) for i in range(7)}}, path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(Plain(), path)
    assert str(info.value) == (f"{path}: 7 keys the model does not have (foreign or other-variant checkpoint?), e.g. "
                               "['extra0', 'extra1', 'extra2', 'extra3', 'extra4']")
    torch.save(Plain(width=4).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(Plain(width=5), path, strict_head=False)
    # the head's shapes differ too, but a head that does not fit is dropped: the four body weights remain
    assert str(info.value) == (f"{path}: 4 shapes do not fit (other variant?), e.g. ['body.0.weight (4, 4) vs model "
                               "(5, 5)', 'body.1.weight (4, 4) vs model (5, 5)', 'body.2.weight (4, 4) vs model (5, 5)']")
    torch.save({k: v for k, v in Plain(layers=7).state_dict().items() if not k.startswith("body.") or k == "body.0.weight"},
               path)
    expected = (f"{path}: 6 backbone keys missing, e.g. ['body.1.weight', 'body.2.weight', 'body.3.weight', "
                "'body.4.weight', 'body.5.weight']")
    with pytest.raises(CheckpointError) as info:
        load_pretrained(Plain(layers=7), path)
    assert str(info.value) == expected
    with caplog.at_level(logging.INFO):
        report = load_pretrained(Plain(layers=7), path, strict_backbone=False)
    assert messages(caplog) == [expected + " (left at their init)"] and len(report.missing) == 6


# --- what check_checkpoint_file and load_checkpoint refuse, message by message -------------------------------------

REFUSED = ("only tensors, plain containers and argparse.Namespace are loaded (torch.load weights_only=True): "
           "unpickling anything else could run code, so this file is refused")


def refused_with(path, check=check_checkpoint_file) -> str:
    with pytest.raises(CheckpointError) as caught:
        check(path)
    return str(caught.value)


def test_a_run_folder_points_at_its_last_checkpoint(tmp_path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert refused_with(run) == f"{run}: is a folder, not a checkpoint file"
    torch.save({}, run / "checkpoints" / "last.ckpt")
    assert refused_with(run) == f"{run}: is a folder, not a checkpoint file (did you mean {run}/checkpoints/last.ckpt?)"


def test_text_and_foreign_files_are_named_by_their_first_bytes(tmp_path) -> None:
    advice = "; give a .ckpt written by train.py or an official .pth"
    text = tmp_path / "notes.ckpt"
    text.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")  # a Git LFS pointer
    # its first line, cut at 40 characters
    assert refused_with(text) == (f"{text}: not a readable torch checkpoint: a text file (it begins "
                                  f"'version https://git-lfs.github.com/spec/'){advice}")
    # only the first 64 bytes are read: a text head followed by binary bytes is still named as text
    headed = tmp_path / "headed.ckpt"
    headed.write_bytes(b"x" * 64 + bytes(range(32)))
    assert refused_with(headed) == (f"{headed}: not a readable torch checkpoint: a text file (it begins "
                                    f"'{'x' * 40}'){advice}")
    foreign = tmp_path / "image.ckpt"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(100)))
    assert refused_with(foreign) == (f"{foreign}: not a readable torch checkpoint: an unknown format (it begins "
                                     f"b'\\x89PNG\\r\\n\\x1a\\n'){advice}")


def test_a_truncated_zip_checkpoint_gives_its_size(tmp_path) -> None:
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])  # the zip directory sits at the end
    assert refused_with(path) == (f"{path}: not a readable torch checkpoint: truncated or damaged (2000 bytes, no "
                                  "complete zip directory; an interrupted copy or save?): use another checkpoint")


def test_several_refused_types_name_one_of_the_files_own_first(tmp_path) -> None:
    import collections
    import decimal
    import fractions
    import typing
    import uuid

    # refused: builtins.range and collections.deque (first by name), decimal.Decimal and fractions.Fraction; a type
    # of the file's own is named first, builtins/typing/collections entries last
    path = tmp_path / "objects.ckpt"
    torch.save({"r": range(3), "q": collections.deque([1]), "d": decimal.Decimal("1.5"),
                "f": fractions.Fraction(1, 3)}, path)
    assert refused_with(path) == f"{path}: holds decimal.Decimal (and 3 other types); {REFUSED}"
    assert refused_with(path, load_checkpoint) == f"{path}: holds decimal.Decimal (and 3 other types); {REFUSED}"
    typed = tmp_path / "typed.ckpt"  # typing.List sorts before uuid.UUID by name, and is named after it
    torch.save({"t": typing.List, "u": uuid.UUID(int=1)}, typed)  # noqa: UP006 (the typing object is the point)
    assert refused_with(typed) == f"{typed}: holds uuid.UUID (and 1 other types); {REFUSED}"
    two = tmp_path / "two.ckpt"
    torch.save({"f": fractions.Fraction(1, 3), "d": decimal.Decimal("1.5")}, two)
    assert refused_with(two) == f"{two}: holds decimal.Decimal (and 1 other types); {REFUSED}"
    one = tmp_path / "one.ckpt"
    torch.save({"f": fractions.Fraction(1, 3)}, one)
    assert refused_with(one) == f"{one}: holds fractions.Fraction; {REFUSED}"


def test_a_pickle_refused_without_a_global_says_so(tmp_path) -> None:
    # EXT1 (copyreg's extension registry) names no module: the weights_only unpickler refuses the instruction
    path = tmp_path / "ext.pth"
    path.write_bytes(b"\x80\x02\x82\x01.")
    assert refused_with(path, load_checkpoint) == (
        f"{path}: holds pickle instructions that weights_only loading refuses; {REFUSED}")


def test_a_damaged_legacy_checkpoint_and_a_non_dict_are_one_line_each(tmp_path) -> None:
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:40])
    try:  # torch's own error for these bytes, as load_checkpoint's message quotes it
        torch.load(legacy, weights_only=True)
    except Exception as e:  # noqa: BLE001
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        quoted = f"{type(e).__name__}: {first_line[:157]}" if first_line else type(e).__name__
    assert refused_with(legacy, load_checkpoint) == (
        f"{legacy}: not a readable torch checkpoint (truncated or damaged?) ({quoted})")
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    assert refused_with(listed, load_checkpoint) == (
        f"{listed}: holds a list, not a checkpoint (a dict of tensors and values)")
