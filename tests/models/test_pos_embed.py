"""The position-embedding resize (class token in the middle) against timm's resample, and the model's use of it."""

from __future__ import annotations

import pytest
import torch
from model_reference import rel_err, split_class_row, timm_resize
from timm.layers import resample_abs_pos_embed

from vision_mamba.models.checkpoints import load_pretrained, resize_pos_embed, save_safetensors
from vision_mamba.models.vim import VisionMamba


@pytest.mark.parametrize(
    ("old", "new"),
    [((14, 14), (28, 20)), ((4, 6), (6, 4)), ((3, 5), (7, 9)), ((8, 6), (4, 3)), ((14, 14), (32, 32))],
)
def test_resize_equals_timms_resample_on_the_patch_rows(old, new) -> None:
    torch.manual_seed(0)
    pe = torch.randn(1, old[0] * old[1] + 1, 8)
    out = resize_pos_embed(pe, old, new)
    assert out.shape == (1, new[0] * new[1] + 1, 8)
    cls, patches = split_class_row(out, new)
    assert torch.equal(cls, pe[:, old[0] * old[1] // 2])  # the class row is carried over, not interpolated
    _, want_patches = split_class_row(timm_resize(pe, old, new), new)
    # both are float32 bicubic with align_corners=False: same arithmetic, rounding-level differences only
    assert rel_err(patches, want_patches) < 1e-6


def test_a_row_column_pattern_stays_in_place_on_non_square_grids() -> None:
    # channel 0 holds the row index, channel 1 the column index: after any resize channel 0 must be constant
    # along each row and grow down the grid, channel 1 constant down each column and grow to the right. A
    # height/width swap or a transposed layout scrambles this.
    old, new = (3, 7), (6, 5)
    rows, cols = torch.meshgrid(torch.arange(old[0]), torch.arange(old[1]), indexing="ij")
    patches = torch.stack([rows, cols], -1).float().reshape(1, -1, 2)
    mid = old[0] * old[1] // 2
    pe = torch.cat([patches[:, :mid], torch.full((1, 1, 2), -100.0), patches[:, mid:]], dim=1)
    out = resize_pos_embed(pe, old, new)
    cls, grid = split_class_row(out, new)
    assert cls.tolist() == [[-100.0, -100.0]]
    grid = grid.reshape(*new, 2)
    row_of, col_of = grid[..., 0], grid[..., 1]
    torch.testing.assert_close(row_of, row_of[:, :1].expand(new), rtol=0, atol=1e-5)
    torch.testing.assert_close(col_of, col_of[:1, :].expand(new), rtol=0, atol=1e-5)
    assert (row_of[1:, 0] > row_of[:-1, 0]).all() and (col_of[0, 1:] > col_of[0, :-1]).all()
    # the ends stay within the old grid's range (bicubic overshoots by little), centres map to centres
    assert row_of[0, 0] < 0.5 and row_of[-1, 0] > old[0] - 1.5 and col_of[0, -1] > old[1] - 1.5
    assert row_of.mean() == pytest.approx((old[0] - 1) / 2, abs=1e-5)
    assert col_of.mean() == pytest.approx((old[1] - 1) / 2, abs=1e-5)


def test_same_grid_is_returned_as_is_and_a_wrong_row_count_is_refused() -> None:
    pe = torch.randn(1, 17, 4)
    assert resize_pos_embed(pe, (4, 4), (4, 4)) is pe
    with pytest.raises(ValueError, match="pos_embed has 17 rows; a \\(3, 5\\) grid needs 16"):
        resize_pos_embed(pe, (3, 5), (4, 4))


def test_resize_without_class_token_is_timms_resample() -> None:
    torch.manual_seed(0)
    pe = torch.randn(1, 12, 4)
    want = resample_abs_pos_embed(pe, new_size=[5, 2], old_size=[3, 4], num_prefix_tokens=0, antialias=False)
    torch.testing.assert_close(resize_pos_embed(pe, (3, 4), (5, 2), num_cls=0), want, rtol=0, atol=1e-6)


def test_bf16_pos_embed_is_resized_in_float32_and_keeps_its_dtype() -> None:
    torch.manual_seed(0)
    pe = torch.randn(1, 26, 8)
    out = resize_pos_embed(pe.bfloat16(), (5, 5), (7, 3))
    assert out.dtype == torch.bfloat16
    want = timm_resize(pe.bfloat16().float(), (5, 5), (7, 3))
    assert rel_err(out.float(), want) < 4e-3  # one bf16 rounding (2^-8 relative)


def model(img_size, **kwargs) -> VisionMamba:
    args = dict(patch_size=8, embed_dim=32, depth=2, num_classes=5, scan_backend="torch")
    return VisionMamba(img_size=img_size, **{**args, **kwargs}).eval()


def test_the_forward_at_another_size_is_the_model_built_for_it_with_timms_resized_table() -> None:
    # the same weights at 32x32 (4x4 grid) and at 48x72 (6x9): a model built at 48x72 holding the weights, with
    # pos_embed resized by timm, computes the same logits
    torch.manual_seed(0)
    native = model(32)
    big = model((48, 72))
    state = dict(native.state_dict())
    state["pos_embed"] = timm_resize(native.pos_embed.detach(), (4, 4), (6, 9))
    big.load_state_dict(state)
    x = torch.randn(2, 3, 48, 72)
    with torch.no_grad():
        got, want = native(x), big(x)
    assert rel_err(got, want) < 1e-5
    # and a pos_embed ignored at the other size would show: the logits move when the table changes
    with torch.no_grad():
        big.pos_embed.add_(1.0)
        assert rel_err(big(x), want) > 1e-2


def test_loading_a_checkpoint_of_another_grid_resizes_like_timm(tmp_path) -> None:
    torch.manual_seed(0)
    src = model(32)
    save_safetensors(src, tmp_path / "w.safetensors")
    dst = model((24, 40))  # 3x5 grid
    report = load_pretrained(dst, tmp_path / "w.safetensors")
    assert report.resized_pos_embed == ((4, 4), (3, 5))
    want = timm_resize(src.pos_embed.detach(), (4, 4), (3, 5))
    assert rel_err(dst.pos_embed, want) < 1e-6
