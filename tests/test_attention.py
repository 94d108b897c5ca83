"""The per-block maps of the served graph: the gated LKA signal against each image's blank reference."""

from __future__ import annotations

import pytest
import torch

from van_app import load_model
from van_app.attention import (
    WithAttentionMaps,
    attention_pass,
    block_keys,
    capture_gated,
    gated_block,
    gated_stages,
    reference,
)
from van_app.fold import fold

from conftest import hooked_pass


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model("van_micro", num_classes=3)


def test_reference_is_a_blank_image_of_each_images_mean_colour():
    x = torch.randn(2, 3, 8, 6)
    blank = reference(x)
    assert torch.allclose(blank, x.mean((2, 3), keepdim=True).expand_as(x))
    assert torch.equal(blank.amax((2, 3)), blank.amin((2, 3)))


def test_folded_block_hands_on_what_its_lka_passes_on(model):
    folded = fold(model)
    block = folded.stages[1].blocks[0]
    features = folded.stages[1].patch_embed(folded.stages[0](torch.randn(1, 3, 48, 48)))
    with torch.no_grad(), capture_gated(folded) as captured:
        out, gated = gated_block(block, features)
        assert torch.equal(out, block(features))
    assert torch.equal(gated, captured[(1, 0)])


def test_the_pass_gives_the_logits_maps_and_evidence_the_hooked_unfolded_model_gives(model):
    x = torch.randn(2, 3, 64, 64)
    want_logits, want_maps, want_evidence = hooked_pass(model, x)
    with torch.inference_mode():
        result = attention_pass(model, x)
    assert torch.allclose(result.logits, want_logits, atol=1e-4) and list(result.maps) == block_keys(model)
    for key, expected in want_maps.items():
        assert torch.allclose(result.maps[key], expected, rtol=1e-3, atol=1e-5)
    assert list(result.evidence) == [0, 1] and result.evidence[0].shape == (2, 16, 16)
    for stage, expected in want_evidence.items():
        assert torch.allclose(result.evidence[stage], expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_the_pass_gives_the_evidence_for_each_images_class_asked_for(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        predicted = attention_pass(model, x).target
        asked = (predicted + torch.tensor([1, 2])) % model.num_classes
        result = attention_pass(model, x, asked)
    _, _, want = hooked_pass(model, x, asked)
    assert torch.equal(result.target, asked)
    for stage, expected in want.items():
        assert torch.allclose(result.evidence[stage], expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_a_target_class_the_model_does_not_have_is_refused(model):
    with pytest.raises(ValueError, match=r"target classes must be in 0\.\.2 .*got \[3\]"):
        attention_pass(model, torch.randn(1, 3, 64, 64), model.num_classes)


def test_an_images_evidence_does_not_depend_on_the_rest_of_its_batch(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        together = attention_pass(model, x)
        alone = [attention_pass(model, x[i:i + 1]) for i in range(2)]
    for i, single in enumerate(alone):
        for stage in (0, 1):
            assert torch.allclose(together.evidence[stage][i], single.evidence[stage][0], rtol=1e-4, atol=1e-7)


def test_an_images_maps_do_not_depend_on_the_rest_of_its_batch(model):
    graph = WithAttentionMaps(fold(model))
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        together = graph(x)
        alone = graph(x[1:2])
    for a, b in zip(together, alone):
        assert torch.allclose(a[1:2], b, rtol=1e-4, atol=1e-5)


def test_a_blank_batch_gets_zero_maps(model):
    x = torch.full((1, 3, 64, 64), 0.3)
    with torch.inference_mode():
        result = attention_pass(fold(model), x)
    assert all(float(m.abs().max()) < 1e-6 for m in [*result.maps.values(), *result.evidence.values()])


def test_gradients_stop_at_the_first_stage_asked_for(model):
    folded = fold(model)
    with torch.enable_grad():
        logits, gated = gated_stages(folded, torch.randn(1, 3, 64, 64), grad_from=2)
    assert all(not g.requires_grad for stage in gated[:2] for g in stage)
    assert all(g.requires_grad for stage in gated[2:] for g in stage) and logits.requires_grad
