"""What an Engine promises beyond routing right: it pools as its router was trained (router.json's views
and layer, not some default), and its timings add up.

A router trained on last-token features of the second-to-last layer must route on exactly those features;
pooling the mean or taking the last layer gives other features, other probabilities.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests import engine_helpers as H
from vlrouter import hookimpl
from vlrouter.core.actions import UIAction
from vlrouter.core.encoder import Encoder
from vlrouter.core.engine import Engine
from vlrouter.core.errors import InputError
from vlrouter.core.head import head_logits
from vlrouter.core.views import resolve_layer, view_key
from vlrouter.plugins.manager import get_plugin_manager

NAMES = ["calendar", "claim-window"]
POOLING, LAYER = "last", -2  # one view, one layer below the last


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_dir, tiny_encoder):
    reg = H.make_project(tmp_path_factory.mktemp("pooling-project"), tiny_model_dir, names=NAMES,
                         encoder=tiny_encoder, pooling=POOLING, layer=LAYER)
    return Engine.from_registry(reg, device="cpu")


def _features(tiny_encoder, image, prompt, *, pooling, layer):
    enc = Encoder(tiny_encoder.model, tiny_encoder.processor, tiny_encoder.base_model)
    return enc.embed([image], [prompt], [layer])[view_key(pooling, resolve_layer(layer, enc.num_layers))]


def test_engine_routes_on_the_features_its_router_was_trained_on(engine, tiny_encoder):
    assert (engine.meta.pooling, engine.meta.layer) == ([POOLING], resolve_layer(LAYER, tiny_encoder.num_layers))
    for image, prompt, _ in H.samples(NAMES):
        trained = _features(tiny_encoder, image, prompt, pooling=POOLING, layer=LAYER)
        torch.testing.assert_close(engine.embed([image], [prompt]), trained, rtol=1e-4, atol=1e-5)
        expected = torch.softmax(head_logits(engine.head, trained)[0] / engine.meta.temperature, -1)
        route = engine.route(image, prompt)
        assert [route.probs[n] for n in NAMES] == pytest.approx(expected.tolist(), abs=1e-5)


def test_other_poolings_would_give_other_features_and_probabilities(engine, tiny_encoder):
    """The test above means something: mean pooling or the last layer would route differently."""
    image, prompt, _ = H.samples(NAMES)[0]
    route = engine.route(image, prompt)
    for pooling, layer in (("mean", LAYER), (POOLING, -1)):
        other = _features(tiny_encoder, image, prompt, pooling=pooling, layer=layer)
        assert not torch.allclose(engine.embed([image], [prompt]), other, rtol=1e-3, atol=1e-3)
        probs = torch.softmax(head_logits(engine.head, other)[0] / engine.meta.temperature, -1)
        assert max(abs(route.probs[n] - p) for n, p in zip(NAMES, probs.tolist())) > 1e-4


def _check_timings(t: dict, wall_ms: float) -> None:
    assert t["vision_calls"] == 1
    assert t["route_ms"] > 0 and t["generate_ms"] > 0
    assert t["route_ms"] + t["generate_ms"] <= t["total_ms"] <= wall_ms  # parts within the whole, in ms
    # routing (image, processor, a forward) and generating (forwards) are no rounding errors of the whole
    assert t["route_ms"] >= 0.05 * t["total_ms"] and t["generate_ms"] >= 0.05 * t["total_ms"]


def test_act_and_act_batch_timings_are_milliseconds_that_add_up(engine):
    (image, prompt, _), (image2, prompt2, _) = H.samples(NAMES)[0], H.samples(NAMES)[2]
    t0 = time.perf_counter()
    action = engine.act(image, prompt, max_new_tokens=4)
    _check_timings(action.timings, (time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    actions = engine.act_batch([(image, prompt), (image2, prompt2)], max_new_tokens=4)
    wall = (time.perf_counter() - t0) * 1e3
    for a in actions:
        _check_timings(a.timings, wall)
        assert a.timings["batch_size"] == 2


class EchoParser:
    """Every text parses to echo(adapter=.., chars=..): shows which adapter and text reached the parser."""

    @hookimpl
    def parse_action(self, adapter, text):
        return UIAction(name="echo", args={"adapter": adapter, "chars": len(text)})


def test_act_batch_parses_each_text_with_the_adapter_that_generated_it(engine):
    echo = Engine(engine.model, engine.processor, engine.head, engine.meta,
                  plugin_manager=get_plugin_manager(extra_plugins=(EchoParser(),)))
    items = [(img, prompt) for img, prompt, _ in H.samples(NAMES)]
    for a in echo.act_batch(items, max_new_tokens=4) + [echo.act(*items[0], max_new_tokens=4)]:
        assert a.action == UIAction(name="echo", args={"adapter": a.adapter, "chars": len(a.text)})


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_a_router_json_temperature_that_is_not_positive_is_refused(engine, temperature):
    with pytest.raises(InputError, match="temperature"):
        Engine(engine.model, engine.processor, engine.head, engine.meta.model_copy(update={"temperature": temperature}))
