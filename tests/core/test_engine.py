"""The engine: one base model, every adapter in one PeftModel, route / act / act_batch."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from tests import engine_helpers as H
from vlrouter import hookimpl
from vlrouter.core.actions import UIAction
from vlrouter.core.encoder import build_inputs
from vlrouter.core.engine import Action, Engine, Route
from vlrouter.core.errors import (
    ImageError,
    InputError,
    LowConfidenceError,
    ModelLoadError,
    StaleRouterError,
)
from vlrouter.core.layout import LAYOUT_DIM
from vlrouter.core.views import inner_vl_model
from vlrouter.plugins.manager import get_plugin_manager

MAX_NEW = 8


class EchoParser:
    """A test plugin: every text parses to echo(adapter=.., chars=..), so the wiring is visible."""

    @hookimpl
    def parse_action(self, adapter, text):
        return UIAction(name="echo", args={"adapter": adapter, "chars": len(text)})


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, tiny_encoder):
    return H.make_project(tmp_path_factory.mktemp("engine-project"), tiny_model_dir, encoder=tiny_encoder)


@pytest.fixture(scope="module")
def engine(project):
    return Engine.from_registry(project, device="cpu")


@pytest.fixture(scope="module")
def items():
    return [(img, prompt) for img, prompt, _ in H.samples()]


def _reference_generate(engine, image, prompt, adapter):
    """What peft itself generates (no engine code in the loop): set_adapter + generate, greedy."""
    model = engine.model
    batch = build_inputs(engine.processor, [image], [prompt])
    with torch.inference_mode():
        if adapter == "base":
            with model.disable_adapter():
                out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False)
        else:
            model.set_adapter(adapter)
            out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False)
    return engine.processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def _count_vision_calls(engine):
    calls = []
    handle = inner_vl_model(engine.model).visual.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def _variant(engine, **kw):
    """Another Engine over the SAME loaded model (the constructor, for embedding)."""
    meta = engine.meta.model_copy(update=kw.pop("meta", {}))
    return Engine(engine.model, engine.processor, engine.head, meta, plugin_manager=engine.plugin_manager, **kw)


# ---- loading and routing ----------------------------------------------------------------

def test_public_api_is_exported():
    import vlrouter

    assert vlrouter.Engine is Engine and vlrouter.Route is Route and vlrouter.Action is Action


def test_routes_each_screen_to_its_adapter(engine):
    assert engine.adapters == H.NAMES
    for img, prompt, expected in H.samples():
        r = engine.route(img, prompt)
        assert r.adapter == expected
        assert list(r.probs) == H.NAMES
        assert sum(r.probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert r.confidence == max(r.probs.values()) == r.probs[expected]


def test_route_accepts_a_path(engine, tmp_path):
    img, prompt, expected = H.samples()[2]
    img.save(tmp_path / "screen.png")
    assert engine.route(tmp_path / "screen.png", prompt) == engine.route(str(tmp_path / "screen.png"), prompt)
    assert engine.route(tmp_path / "screen.png", prompt).adapter == expected


def test_route_probs_are_the_temperature_scaled_softmax(engine, tiny_encoder):
    img, prompt, _ = H.samples()[0]
    feats = H.features(tiny_encoder, [img], [prompt])
    with torch.no_grad():
        logits = engine.head(feats)[0]
    for t in (1.0, 4.0):
        e = _variant(engine, meta={"temperature": t})
        r = e.route(img, prompt)
        expected = torch.softmax(logits / t, -1).tolist()
        assert [r.probs[n] for n in H.NAMES] == expected  # same features, same head: exactly
    hot = _variant(engine, meta={"temperature": 4.0})
    assert hot.route(img, prompt).confidence < engine.route(img, prompt).confidence


def test_routing_features_equal_a_plain_base_model_exactly(engine, tiny_encoder):
    """Adapters are loaded, but routing runs under disable_adapter(): the base's features, bit for bit."""
    for img, prompt, _ in H.samples():
        assert torch.equal(engine.embed([img], [prompt]), H.features(tiny_encoder, [img], [prompt]))
    imgs, prompts = [s[0] for s in H.samples()], [s[1] for s in H.samples()]
    assert torch.equal(engine.embed(imgs, prompts), H.features(tiny_encoder, imgs, prompts))


def test_one_copy_of_the_base_weights(engine, tiny_encoder):
    base_params = [(n, p) for n, p in engine.model.named_parameters() if "lora_" not in n]
    lora_params = [p for n, p in engine.model.named_parameters() if "lora_" in n]
    # the same number of base weights as a plain base model, each stored once
    assert sum(p.numel() for _, p in base_params) == sum(p.numel() for p in tiny_encoder.model.parameters())
    assert len({p.data_ptr() for _, p in base_params}) == len(base_params)
    # each adapter adds only its small LoRA matrices
    assert 0 < sum(p.numel() for p in lora_params) < 0.5 * sum(p.numel() for _, p in base_params)
    assert set(engine.model.peft_config) == set(H.NAMES)


def test_routing_and_generation_share_the_base_weight_storage(engine, items):
    q = inner_vl_model(engine.model).language_model.layers[0].self_attn.q_proj
    seen = []
    handle = q.base_layer.register_forward_hook(lambda mod, *a: seen.append(mod.weight.data_ptr()))
    try:
        engine.route(*items[0])
        routed = set(seen)
        seen.clear()
        action = engine.act(*items[0], max_new_tokens=2)
        assert action.adapter in H.NAMES
        generated = set(seen)
    finally:
        handle.remove()
    assert routed == generated and len(routed) == 1


# ---- acting -----------------------------------------------------------------------------

def test_act_text_equals_peft_generate_with_the_routed_adapter(engine):
    by_adapter = {}
    for img, prompt, expected in H.samples():
        a = engine.act(img, prompt, max_new_tokens=MAX_NEW)
        assert a.adapter == a.routed == expected and not a.fallback
        assert a.text == _reference_generate(engine, img, prompt, expected)
        by_adapter.setdefault(expected, a.text)
    img, prompt, expected = H.samples()[0]
    # the adapters really change what is generated (else this test would prove nothing)
    outputs = {n: _reference_generate(engine, img, prompt, n) for n in [*H.NAMES, "base"]}
    assert len(set(outputs.values())) > 1


def test_act_parses_with_plugins_and_keeps_raw_text(engine, items):
    e = _variant(engine)
    e.plugin_manager = get_plugin_manager(extra_plugins=(EchoParser(),), entry_points=False)
    a = e.act(*items[0], max_new_tokens=4)
    assert isinstance(a.action, UIAction)
    assert a.action.args == {"adapter": a.adapter, "chars": len(a.text)}
    assert set(a.timings) >= {"route_ms", "generate_ms", "total_ms"}
    assert a.timings["route_ms"] > 0 and a.timings["generate_ms"] > 0
    assert a.timings["total_ms"] >= a.timings["route_ms"] + a.timings["generate_ms"] - 1e-6
    d = a.to_dict()
    assert json.loads(json.dumps(d))["action"] == {"name": "echo", "args": a.action.args, "call": str(a.action)}
    assert d["text"] == a.text and d["adapter"] == a.adapter
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.adapter = "other"


def test_unparseable_text_gives_no_action_but_keeps_text(engine, items):
    a = engine.act(*items[0], max_new_tokens=4)  # random tiny model: gibberish, no `name(k=v)` call
    assert a.action is None and isinstance(a.text, str)
    assert a.to_dict()["action"] is None


def test_route_to_dict_is_json(engine, items):
    r = engine.route(*items[0])
    assert json.loads(json.dumps(r.to_dict())) == {"adapter": r.adapter, "confidence": r.confidence,
                                                   "probs": r.probs, "ood_score": None, "known": True}


def test_vision_tower_runs_once_per_act(engine, items):
    calls, handle = _count_vision_calls(engine)
    try:
        for img, prompt in items[:3]:
            calls.clear()
            a = engine.act(img, prompt, max_new_tokens=MAX_NEW)
            assert len(calls) == 1 and a.timings["vision_calls"] == 1
        calls.clear()
        engine.act_batch(items, max_new_tokens=MAX_NEW)
        assert len(calls) == 1
    finally:
        handle.remove()
    # outside an act the model is untouched: nothing cached, plain method again
    assert "get_image_features" not in inner_vl_model(engine.model).__dict__


@pytest.fixture(scope="module")
def vision_engine(tmp_path_factory, tiny_model_dir, tiny_encoder):
    names = ["calendar", "claim-window"]
    reg = H.make_project(tmp_path_factory.mktemp("vision-project"), tiny_model_dir, names=names,
                         target_modules=H.VISION_TARGETS, encoder=tiny_encoder)
    return Engine.from_registry(reg, device="cpu")


def test_adapter_with_vision_weights_re_encodes_the_image(vision_engine):
    assert vision_engine.vision_adapters == {"calendar", "claim-window"}
    calls, handle = _count_vision_calls(vision_engine)
    try:
        for img, prompt, expected in H.samples(["calendar", "claim-window"]):
            calls.clear()
            a = vision_engine.act(img, prompt, max_new_tokens=MAX_NEW)
            assert len(calls) == 2
            assert a.adapter == expected
            assert a.text == _reference_generate(vision_engine, img, prompt, expected)
    finally:
        handle.remove()


def test_mixed_batch_with_vision_adapters_still_equals_per_item(vision_engine):
    items = [(i, p) for i, p, _ in H.samples(["calendar", "claim-window"])]
    batch = vision_engine.act_batch(items, max_new_tokens=MAX_NEW)
    single = [vision_engine.act(i, p, max_new_tokens=MAX_NEW) for i, p in items]
    assert len({a.adapter for a in batch}) == 2
    assert [(a.adapter, a.text) for a in batch] == [(a.adapter, a.text) for a in single]


def test_act_batch_equals_per_item_act(engine, items, monkeypatch):
    calls = []
    real_generate = engine.model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs.get("adapter_names"))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", counting_generate)
    batch = engine.act_batch(items, max_new_tokens=MAX_NEW)
    assert calls == [[a.adapter for a in batch]]  # ONE generate call, one adapter per row
    monkeypatch.undo()
    single = [engine.act(i, p, max_new_tokens=MAX_NEW) for i, p in items]
    assert len({a.adapter for a in batch}) == 3  # really a mixed-adapter batch
    assert [(a.adapter, a.routed, a.text, a.action) for a in batch] == \
           [(a.adapter, a.routed, a.text, a.action) for a in single]
    for b, s in zip(batch, single):
        assert b.confidence == pytest.approx(s.confidence, abs=1e-4)
        assert b.timings["batch_size"] == len(items)


def test_act_batch_mixes_base_fallback_and_adapters(engine, items):
    warm = _variant(engine, meta={"temperature": 25.0})
    confs = sorted(r.confidence for r in warm.route_batch(items))
    threshold = (confs[len(confs) // 2 - 1] + confs[len(confs) // 2]) / 2
    e = _variant(engine, meta={"temperature": 25.0}, min_confidence=threshold, fallback="base")
    batch = e.act_batch(items, max_new_tokens=MAX_NEW)
    single = [e.act(i, p, max_new_tokens=MAX_NEW) for i, p in items]
    assert "base" in {a.adapter for a in batch} and len({a.adapter for a in batch}) > 1
    assert [(a.adapter, a.text) for a in batch] == [(a.adapter, a.text) for a in single]


def test_fallback_base_below_min_confidence(engine, items):
    e = _variant(engine, meta={"temperature": 50.0}, min_confidence=1.0, fallback="base")
    img, prompt = items[0]
    a = e.act(img, prompt, max_new_tokens=MAX_NEW)
    assert a.adapter == "base" and a.routed == "calendar" and a.fallback
    assert a.confidence < 1.0
    assert a.text == _reference_generate(engine, img, prompt, "base")


def test_by_default_a_low_confidence_still_acts_with_the_routed_adapter(engine, items):
    e = _variant(engine, meta={"temperature": 50.0})  # no min_confidence given: the default, 0
    a = e.act(*items[0], max_new_tokens=2)
    assert e.min_confidence == 0.0 and a.confidence < 1.0
    assert (a.adapter, a.routed, a.fallback) == ("calendar", "calendar", False)


def test_prepared_inputs_are_on_the_engine_device(engine, items):
    import copy

    moved = copy.copy(engine)
    moved.device = torch.device("meta")  # stands for an accelerator: every tensor must go there
    batch = moved._prepare(items[:2])
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(v.device.type == "meta" for v in tensors)
    assert {k for k, v in batch.items() if isinstance(v, torch.Tensor)} >= {"input_ids", "pixel_values"}


def test_fallback_to_a_named_adapter(engine, items):
    e = _variant(engine, meta={"temperature": 50.0}, min_confidence=1.0, fallback="provider-select")
    img, prompt = items[0]
    a = e.act(img, prompt, max_new_tokens=MAX_NEW)
    assert (a.adapter, a.routed) == ("provider-select", "calendar")
    assert a.text == _reference_generate(engine, img, prompt, "provider-select")


def test_fallback_error_raises(engine, items):
    e = _variant(engine, meta={"temperature": 50.0}, min_confidence=1.0, fallback="error")
    with pytest.raises(LowConfidenceError, match=r"below router.min_confidence.*fix:"):
        e.act(*items[0], max_new_tokens=2)
    with pytest.raises(LowConfidenceError, match="item 0"):
        e.act_batch(items[:2], max_new_tokens=2)
    assert e.route(*items[0]).adapter == "calendar"  # routing alone never falls back


def test_concurrent_acts_equal_sequential(engine, items):
    expected = [engine.act(i, p, max_new_tokens=MAX_NEW) for i, p in items]
    results: dict[int, Action] = {}
    errors = []

    def worker(k):
        try:
            for j in range(len(items)):
                idx = (j + k) % len(items)
                a = engine.act(*items[idx], max_new_tokens=MAX_NEW)
                assert results.setdefault(idx, a).text == a.text
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [(results[i].adapter, results[i].text) for i in range(len(items))] == \
           [(a.adapter, a.text) for a in expected]


def test_generate_kwargs_pass_through(engine, items):
    a = engine.act(*items[0], max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)
    assert len(engine.processor.tokenizer(a.text)["input_ids"]) >= 1
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.act(*items[0], max_new_tokens=0)
    with pytest.raises(InputError, match="adapter_names"):
        engine.act(*items[0], adapter_names=["calendar"])


# ---- bad inputs -------------------------------------------------------------------------

def test_unopenable_image_is_an_image_error(engine, tmp_path):
    with pytest.raises(ImageError, match="not found"):
        engine.act(tmp_path / "nope.png", "Click")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ImageError, match="bad.png.*cannot open image"):
        engine.route(bad, "Click")
    with pytest.raises(ImageError, match="item 1 image"):
        engine.act_batch([(H.screen("calendar"), "Click"), (b"garbage", "Click")])


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_empty_prompt_is_an_input_error(engine, prompt):
    with pytest.raises(InputError, match="prompt is empty"):
        engine.act(H.screen("calendar"), prompt)
    with pytest.raises(InputError, match="prompt is empty"):
        engine.route(H.screen("calendar"), prompt)


def test_constructor_refuses_a_model_without_the_adapters(engine, tiny_encoder):
    with pytest.raises(InputError, match="PeftModel"):
        Engine(tiny_encoder.model, engine.processor, engine.head, engine.meta)
    meta = engine.meta.model_copy(update={"adapters": ["calendar", "claim-window", "nope"]})
    with pytest.raises(InputError, match="nope"):
        Engine(engine.model, engine.processor, engine.head, meta)
    with pytest.raises(InputError, match="fallback"):
        Engine(engine.model, engine.processor, engine.head, engine.meta, fallback="nope")



def test_an_error_about_a_single_item_names_no_item_and_one_in_a_batch_names_its_index(engine):
    img = H.screen("calendar")
    with pytest.raises(InputError) as e:
        engine.route(img, "  ")
    assert str(e.value) == "prompt is empty (fix: pass the instruction text, e.g. 'Click March 29')"
    with pytest.raises(InputError) as e:
        engine.route_batch([(img, "Click"), (img, "")])
    assert str(e.value) == "item 1: prompt is empty (fix: pass the instruction text, e.g. 'Click March 29')"
    with pytest.raises(ImageError) as e:
        engine.route(b"garbage", "Click")
    assert "item" not in str(e.value)


def test_constructor_refuses_a_router_reading_a_layer_the_model_does_not_have(engine):
    n = engine.meta.num_layers
    with pytest.raises(InputError) as e:
        _variant(engine, meta={"layer": n + 5, "num_layers": n + 5})  # a router made for a deeper model
    assert str(e.value) == (f"router.json: layer: {n + 5} is out of range for a model with {n} layers (fix: use "
                            f"1..{n} (or -1..-{n + 1}; -1 is the last), or auto)")
    with pytest.raises(InputError, match=rf"router.json: layer: {n + 5} is out of range"):
        _variant(engine, meta={"layer": -1, "num_layers": n + 5})  # the last layer of a deeper model: not ours
    old = _variant(engine, meta={"layer": -1, "num_layers": None})  # a format-1 router: -1 means this model's last
    assert old.meta.num_layers == n and old.representation == engine.representation


class FixedOOD:
    """An OOD model whose scores are given (the real one's threshold semantics: score <= threshold is known)."""

    screen_views = ("image-std", "layout")  # reads both screenshot views, like a router fitted with them

    def __init__(self, scores, threshold):
        self.scores, self.threshold, self.seen = scores, threshold, []

    def score(self, feats, content=None, layout=None):
        self.seen.append((feats, content, layout))
        return torch.tensor(self.scores[: feats.shape[0]], dtype=torch.float64)


def test_an_input_scoring_exactly_the_ood_threshold_is_known(engine, items):
    """The threshold is the validation quantile kept known: a score equal to it is in, just above is out."""
    ood = FixedOOD([1.5, 1.5 + 1e-9, 0.25], 1.5)
    e = _variant(engine, ood=ood)
    routes = e.route_batch(items[:3])
    feats, content, layout = ood.seen[-1]  # the standardized features the head reads, and the screenshot views
    with torch.no_grad():
        torch.testing.assert_close(feats, engine.head[0](engine.embed([i for i, _ in items[:3]],
                                                                      [p for _, p in items[:3]])))
    assert content is not None and content.shape[0] == 3
    assert layout is not None and layout.shape == (3, LAYOUT_DIM) and torch.allclose(layout.norm(dim=1), torch.ones(3))
    assert [r.known for r in routes] == [True, False, True]
    assert [r.ood_score for r in routes] == [1.5, 1.5 + 1e-9, 0.25]
    assert [r.known for r in engine.route_batch(items[:3])] == [True] * 3  # no OOD model: everything known


def test_the_registry_plugin_modules_parse_in_the_engine_and_a_given_manager_is_used_as_is(project, items,
                                                                                           monkeypatch):
    import sys
    import types

    mod = types.ModuleType("tests_engine_echo_plugin")
    mod.parse_action = hookimpl(lambda adapter, text: UIAction(name="echo", args={"adapter": adapter}))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    reg = project.parent / "plugin-registry.yaml"
    entry = "  - name: calendar\n"
    reg.write_text(project.read_text().replace(entry, f"{entry}    plugin: {mod.__name__}\n"))
    engine = Engine.from_registry(reg, device="cpu")
    assert engine.plugin_manager.get_plugin(mod.__name__) is mod
    act = engine.act(*items[0], max_new_tokens=2, adapter="calendar")
    assert act.action == UIAction(name="echo", args={"adapter": "calendar"})
    pm = get_plugin_manager(extra_plugins=(EchoParser(),), entry_points=False)
    assert Engine.from_registry(reg, device="cpu", plugin_manager=pm).plugin_manager is pm


# ---- loading errors ---------------------------------------------------------------------

def _copy_project(project: Path, dst: Path) -> Path:
    shutil.copytree(project.parent, dst, symlinks=True)
    return dst / "registry.yaml"


def test_stale_router_adapter_order(project, tmp_path):
    reg = _copy_project(project, tmp_path / "p")
    text = reg.read_text()
    head = text.split("adapters:\n")[0]
    names = ["claim-window", "calendar", "provider-select"]
    body = "".join(f"  - name: {n}\n    dataset: data/{n}/train.jsonl\n    checkpoint: checkpoints/{n}\n"
                   for n in names)
    reg.write_text(head + "adapters:\n" + body)
    with pytest.raises(StaleRouterError, match=r"router.json: adapters: stale router: the adapter order differs.*"
                                                r"router retrain"):
        Engine.from_registry(reg, device="cpu")


def test_stale_router_adapter_set(project, tmp_path):
    reg = _copy_project(project, tmp_path / "p")
    with reg.open("a") as f:
        f.write("  - name: new-task\n    dataset: data/new/train.jsonl\n    checkpoint: checkpoints/calendar\n")
    with pytest.raises(StaleRouterError, match="adapter set differs.*new-task.*router retrain"):
        Engine.from_registry(reg, device="cpu")


@pytest.mark.parametrize("field,value,match", [("base_model", "Qwen/Qwen3-VL-8B-Instruct", "trained on"),
                                                ("pooling", "last", "pooling"), ("layer", -2, "layer")])
def test_stale_router_base_model_pooling_layer(project, tmp_path, field, value, match):
    reg = _copy_project(project, tmp_path / "p")
    meta_path = reg.parent / "runs" / "router" / "router.json"
    meta = json.loads(meta_path.read_text())
    meta[field] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StaleRouterError, match=f"{match}.*router retrain"):
        Engine.from_registry(reg, device="cpu")


@pytest.mark.parametrize("recorded", ["as written", "resolved", "resolved, registry opened by a relative path"])
def test_router_base_model_may_be_recorded_as_written_or_resolved(project, tmp_path, tiny_model_dir, recorded,
                                                                  monkeypatch):
    """registry.yaml `base_model: models/tiny` (relative to its folder): router.json may hold either form
    (core/train.py records the absolute folder)."""
    reg = _copy_project(project, tmp_path / "p")
    (reg.parent / "models").mkdir()
    (reg.parent / "models" / tiny_model_dir.name).symlink_to(tiny_model_dir)
    rel = f"models/{tiny_model_dir.name}"
    reg.write_text(reg.read_text().replace(f"base_model: {tiny_model_dir}", f"base_model: {rel}"))
    meta_path = reg.parent / "runs" / "router" / "router.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"] = rel if recorded == "as written" else str(reg.parent / rel)
    meta_path.write_text(json.dumps(meta))
    if recorded.endswith("relative path"):
        monkeypatch.chdir(reg.parent)
        reg = Path("registry.yaml")
    assert Engine.from_registry(reg, device="cpu").route(*H.samples()[0][:2]).adapter == "calendar"


def test_missing_adapter_checkpoint_names_adapter_path_and_field(project, tmp_path):
    reg = _copy_project(project, tmp_path / "p")
    shutil.rmtree(reg.parent / "checkpoints" / "claim-window")
    with pytest.raises(ModelLoadError) as ei:
        Engine.from_registry(reg, device="cpu")
    msg = str(ei.value)
    assert "adapters[1].checkpoint" in msg and "'claim-window'" in msg
    assert str(reg.parent / "checkpoints" / "claim-window") in msg
    assert f"{reg}:" in msg  # file:line
    line = next(i for i, ln in enumerate(reg.read_text().splitlines(), 1) if "checkpoints/claim-window" in ln)
    assert f"{reg}:{line}" in msg


def test_adapter_made_for_another_base_model_is_refused(project, tmp_path):
    reg = _copy_project(project, tmp_path / "p")
    cfg_path = reg.parent / "checkpoints" / "provider-select" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen3-VL-2B-Instruct"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"adapters\[2\].checkpoint.*'provider-select'.*made for base model "
                                             r"'Qwen/Qwen3-VL-2B-Instruct'"):
        Engine.from_registry(reg, device="cpu")
    # the check is by name only; the escape hatch loads it (the weights do fit this model)
    assert Engine.from_registry(reg, device="cpu", check_base_model=False).adapters == H.NAMES


def test_adapter_base_name_match_is_loose():
    from vlrouter.core.lora import _model_basename

    same = {"Qwen/Qwen3-VL-8B-Instruct", "/models/Qwen3-VL-8B-Instruct/",
            "/hf/hub/models--Qwen--Qwen3-VL-8B-Instruct/snapshots/0123abcd"}
    assert {_model_basename(s) for s in same} == {"qwen3-vl-8b-instruct"}
    assert _model_basename("Qwen/Qwen3-VL-2B-Instruct") != "qwen3-vl-8b-instruct"


def test_adapter_with_another_hidden_size_is_a_model_load_error(project, tmp_path, tiny_model_dir):
    from vlrouter.core.tiny import TinySpec, build_tiny_model

    # a different model under the same folder name: only the shapes can tell
    other = build_tiny_model(tmp_path / "other" / tiny_model_dir.name, TinySpec(hidden_size=32, heads=2, kv_heads=1,
                                                                               intermediate_size=64))
    reg = _copy_project(project, tmp_path / "p")
    ck = reg.parent / "checkpoints" / "claim-window"
    shutil.rmtree(ck)
    H.make_lora_adapters(other, ck.parent, ["claim-window"])
    with pytest.raises(ModelLoadError) as ei:
        Engine.from_registry(reg, device="cpu")
    msg = str(ei.value)
    assert "'claim-window'" in msg and str(ck) in msg and "does not fit the base model" in msg
    assert "size mismatch" in msg and "adapters[1].checkpoint" in msg


def test_missing_router_says_how_to_train_one(project, tmp_path):
    from vlrouter.core.errors import CheckpointError

    reg = _copy_project(project, tmp_path / "p")
    shutil.rmtree(reg.parent / "runs")
    with pytest.raises(CheckpointError, match="router.json not found.*router retrain"):
        Engine.from_registry(reg, device="cpu")

