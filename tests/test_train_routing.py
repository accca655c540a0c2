"""Routing tap: aux loss equals the model's own, and activation checkpointing replays router decisions."""

import copy

import pytest
import torch

from scout_mm import ScoutConfig, ScoutForConditionalGeneration
from scout_mm.train.routing import RoutingTap, enable_activation_checkpointing


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    config = ScoutConfig.from_preset("tiny", num_hidden_layers=2)
    config.vision = None
    return ScoutForConditionalGeneration(config)


def test_tap_aux_loss_and_load_match_the_model(text_model):
    model = copy.deepcopy(text_model).train()
    tap = RoutingTap(model)
    ids = torch.randint(0, 7000, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    tap.start_forward()
    out = model(input_ids=ids, attention_mask=mask.long(), labels=ids)
    torch.testing.assert_close(tap.aux_loss(mask), out.aux_loss)
    load = tap.expert_load(mask)
    assert load.shape == (2, 16) and torch.equal(load.sum(-1), torch.full((2,), 70.0 * 2))


def test_checkpointed_layers_replay_routing_and_give_the_same_gradients(text_model):
    plain, checkpointed = copy.deepcopy(text_model).train(), copy.deepcopy(text_model).train()
    taps = [RoutingTap(plain), RoutingTap(checkpointed)]
    assert enable_activation_checkpointing(checkpointed, taps[1]) == 2
    ids = torch.randint(0, 7000, (2, 300))
    grads = []
    for model, tap in zip((plain, checkpointed), taps):
        tap.start_forward()
        out = model(input_ids=ids, labels=ids, with_aux_loss=False)
        (out.loss + 0.01 * tap.aux_loss(None)).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        assert all(not saved for saved in tap._saved.values())  # every recorded decision was replayed
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0)
    assert list(dict(plain.named_parameters())) == list(dict(checkpointed.named_parameters()))


def test_replay_overrides_a_different_topk(text_model):
    # If recomputation chose other experts, the layer would compute something else; the replayed ids win.
    model = copy.deepcopy(text_model).train()
    tap = RoutingTap(model)
    router = tap.routers[0]
    logits = torch.randn(5, 16)
    with tap.recording():
        chosen = tap(router, logits)
    with tap.replaying():
        assert torch.equal(tap(router, -logits), chosen)
    with tap.replaying(), pytest.raises(RuntimeError, match="no recorded decision"):
        tap(router, logits)
