"""The DiT network: shapes, the adaLN-Zero initialisation, parameter counts, patchify, label dropout, CFG."""
import dataclasses

import pytest
import torch

from dit import PRESETS, DiT, DiTConfig, count_parameters, sincos_pos_embed_2d


def tiny(**kw):
    return DiTConfig(**{**dict(image_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2), **kw})


def randomize(model, std=0.05):
    """Give the zero-initialised layers random weights so outputs are non-trivial."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("preset", ["DiT-T/4", "DiT-S/8"])
def test_output_shape(preset, channels, learn_sigma):
    cfg = dataclasses.replace(PRESETS[preset], in_channels=channels, learn_sigma=learn_sigma)
    model = DiT(cfg).eval()
    x = torch.randn(2, channels, 32, 32)
    out = model(x, torch.tensor([0, 999]), torch.tensor([3, cfg.null_class]))
    assert out.shape == (2, channels * (2 if learn_sigma else 1), 32, 32)


def test_other_image_size_and_bad_patch():
    model = DiT(tiny(image_size=24, patch_size=4, in_channels=3))
    assert model(torch.randn(1, 3, 24, 24), torch.tensor([5]), torch.tensor([1])).shape == (1, 3, 24, 24)
    with pytest.raises(ValueError, match="divisible"):
        DiT(tiny(image_size=30, patch_size=4))


def test_fresh_model_outputs_exactly_zero():
    model = DiT(PRESETS["DiT-T/4"])
    out = model(torch.randn(4, 1, 32, 32), torch.randint(0, 1000, (4,)), torch.randint(0, 11, (4,)))
    assert torch.equal(out, torch.zeros_like(out))


def test_seed_model_parameter_count_matches_official():
    # Official facebookresearch/DiT DiT-S/8 at 32x32, 1 channel: 32,515,648 trainable weights
    # (+6,144 for its pos_embed Parameter, which we keep as a buffer), 32,540,288 with learned sigma.
    assert count_parameters(DiT(PRESETS["DiT-S/8"])) == 32_515_648
    assert count_parameters(DiT(dataclasses.replace(PRESETS["DiT-S/8"], learn_sigma=True))) == 32_540_288
    assert 1_000_000 <= count_parameters(DiT(PRESETS["DiT-T/4"])) <= 3_000_000


def test_presets_cover_the_paper_grid():
    for size in ("S", "B", "L", "XL"):
        for patch in (2, 4, 8):
            assert PRESETS[f"DiT-{size}/{patch}"].patch_size == patch
    assert PRESETS["DiT-XL/2"].hidden_size == 1152 and PRESETS["DiT-XL/2"].depth == 28


def test_patchify_unpatchify_round_trip():
    cfg = tiny(in_channels=3)
    model = DiT(cfg)
    p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
    x = torch.randn(2, 3, 16, 16)
    # Cut x into patches by hand, flattened in the (p1, p2, c) order the final layer emits.
    tokens = x.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 3)
    assert torch.equal(model.unpatchify(tokens), x)


def test_position_embedding_matches_official_layout():
    emb = sincos_pos_embed_2d(8, 3)                      # (9, 8): token k = row * 3 + col
    assert emb.shape == (9, 8)
    # First half encodes the column, second half the row; sin(0)=0, cos(0)=1 at the origin.
    assert torch.allclose(emb[0], torch.tensor([0., 0., 1., 1., 0., 0., 1., 1.]))
    assert torch.allclose(emb[1, :4], emb[4, :4]) and torch.allclose(emb[3, 4:], emb[4, 4:])


def test_label_dropout_uses_null_row():
    cfg = tiny(class_dropout_prob=1.0)
    model = DiT(cfg).train()
    y = torch.tensor([0, 1, 2, 3])
    assert torch.equal(model.y_embedder.drop_labels(y), torch.full_like(y, cfg.null_class))
    emb = model.y_embedder(y)
    assert torch.equal(emb, model.y_embedder.embedding_table.weight[cfg.null_class].expand(4, -1))
    model.eval()                                         # no dropout at inference
    assert torch.equal(model.y_embedder(y), model.y_embedder.embedding_table.weight[y])
    half = DiT(tiny(class_dropout_prob=0.5)).y_embedder
    torch.manual_seed(0)
    share = (half.drop_labels(torch.zeros(10000, dtype=torch.long)) == 10).float().mean()
    assert 0.47 < share < 0.53


def test_batch_elements_are_independent():
    model = randomize(DiT(tiny())).eval()
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(model(x, t, y)[2:3], model(x[2:3], t[2:3], y[2:3]), atol=1e-5)
