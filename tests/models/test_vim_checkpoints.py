"""Checkpoints: official training-checkpoint layout, safetensors, pos-embed resizing, heads and clear file errors."""

from __future__ import annotations

import argparse
import logging
import pathlib

import pytest
import timm
import torch

from vision_mamba.models.checkpoints import (
    CheckpointError,
    checkpoint_filter_fn,
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
