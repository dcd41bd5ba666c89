"""registry.yaml's engine: and serve: sections: strict, bounded, every error naming the field, its line and a fix."""

from __future__ import annotations

import pytest

from vlrouter.core.errors import RegistryError
from vlrouter.core.registry import Registry

HEAD = "base_model: Qwen/Qwen3-VL-8B-Instruct\nadapters: []\n"


def test_defaults_keep_everything_resident_local_and_one_h100():
    m = Registry.from_bytes(HEAD.encode()).model
    assert (m.engine.max_loaded_adapters, m.engine.generation, m.engine.vllm_url) == (None, "local", None)
    s = m.serve
    assert (s.gpu, s.min_containers, s.max_containers, s.scaledown_window, s.concurrency, s.timeout) == \
        ("H100", 0, 1, 300, 8, 600)


def test_a_full_setting_round_trips():
    text = HEAD + ("engine:\n  max_loaded_adapters: 4\n  generation: vllm\n  vllm_url: http://10.0.0.5:8001/v1\n"
                   "  vllm_timeout: 30\n  vllm_model: qwen3-vl\n  vllm_lora_dir: /srv/loras\n"
                   "serve:\n  gpu: L40S\n  min_containers: 1\n  max_containers: 10\n  scaledown_window: 120\n"
                   "  concurrency: 16\n  timeout: 300\n")
    m = Registry.from_bytes(text.encode()).model
    assert m.engine.max_loaded_adapters == 4 and m.engine.vllm_url == "http://10.0.0.5:8001/v1"
    assert m.serve.max_containers == 10 and m.serve.concurrency == 16


@pytest.mark.parametrize("body,line,message,fix", [
    pytest.param("engine:\n  generation: vllm\n", 3, "engine.vllm_url: required when engine.generation is vllm",
                 "write the vLLM server's address", id="vllm-without-url"),
    pytest.param("engine:\n  generation: vllm\n  vllm_url: 127.0.0.1:8001\n", 5, "engine.vllm_url: '127.0.0.1:8001' "
                 "is not an http(s) URL", "write the vLLM server's address", id="url-without-scheme"),
    pytest.param("engine:\n  max_loaded_adapters: 0\n", 4, "engine.max_loaded_adapters: Input should be greater than "
                 "or equal to 1", "remove the key to keep every adapter loaded", id="cap-zero"),
    pytest.param("engine:\n  generation: tgi\n", 4, "engine.generation: Input should be 'local' or 'vllm'",
                 "use one of the allowed values", id="unknown-generation"),
    pytest.param("engine:\n  max_loaded: 4\n", 4, "engine.max_loaded: unknown key 'max_loaded'",
                 "rename it to 'max_loaded_adapters'", id="engine-typo"),
    pytest.param("serve:\n  min_containers: 3\n  max_containers: 2\n", 4, "serve.min_containers: 3 is above "
                 "serve.max_containers (2)", "lower serve.min_containers", id="min-above-max"),
    pytest.param("serve:\n  scaledown_window: 7200\n", 4, "serve.scaledown_window: Input should be less than or "
                 "equal to 3600", "Modal's limits", id="scaledown-past-modal-limit"),
    pytest.param("serve:\n  concurrency: .inf\n", 4, "serve.concurrency:", "correct the value", id="infinite"),
])
def test_bad_values_are_located_errors_with_a_fix(body, line, message, fix):
    with pytest.raises(RegistryError) as e:
        Registry.from_bytes((HEAD + body).encode(), "registry.yaml")
    text = str(e.value)
    assert text.startswith(f"registry.yaml:{line}: {message}"), text
    assert f"(fix: {fix}" in text or fix in text.split("(fix:")[1], text


def test_a_vllm_timeout_under_a_second_is_allowed_and_zero_is_not():
    text = HEAD + "engine:\n  generation: vllm\n  vllm_url: http://127.0.0.1:8001\n  vllm_timeout: 0.5\n"
    assert Registry.from_bytes(text.encode()).model.engine.vllm_timeout == 0.5
    with pytest.raises(RegistryError) as e:
        Registry.from_bytes(text.replace("0.5", "0").encode(), "registry.yaml")
    assert str(e.value).startswith("registry.yaml:6: engine.vllm_timeout: Input should be greater than 0"), str(e.value)


# Every bounded engine:/serve: setting: (section, key, lowest allowed, highest allowed, just below, just above).
LIMITS = [
    ("engine", "max_loaded_adapters", 1, 100_000, 0, 100_001),
    ("engine", "vllm_timeout", 0.001, 3600, 0, 3600.5),
    ("serve", "min_containers", 0, 1000, -1, 1001),
    ("serve", "max_containers", 1, 1000, 0, 1001),
    ("serve", "scaledown_window", 2, 3600, 1, 3601),
    ("serve", "concurrency", 1, 1000, 0, 1001),
    ("serve", "timeout", 10, 86_400, 9, 86_401),
]


def _setting(section: str, key: str, value) -> str:
    extra = {"min_containers": "  max_containers: 1000\n", "vllm_timeout": "  vllm_url: http://127.0.0.1:8001\n"}
    return HEAD + f"{section}:\n  {key}: {value}\n" + extra.get(key, "")


@pytest.mark.parametrize(("section", "key", "low", "high", "under", "over"), LIMITS, ids=[x[1] for x in LIMITS])
def test_each_setting_takes_exactly_its_documented_range(section, key, low, high, under, over):
    for ok in (low, high):
        assert getattr(getattr(Registry.from_bytes(_setting(section, key, ok).encode()).model, section), key) == ok
    for bad in (under, over):
        with pytest.raises(RegistryError) as e:
            Registry.from_bytes(_setting(section, key, bad).encode(), "registry.yaml")
        assert str(e.value).startswith(f"registry.yaml:4: {section}.{key}: Input should be "), str(e.value)


def test_as_many_warm_containers_as_the_maximum_is_allowed():
    s = Registry.from_bytes((HEAD + "serve:\n  min_containers: 3\n  max_containers: 3\n").encode()).model.serve
    assert (s.min_containers, s.max_containers) == (3, 3)


@pytest.mark.parametrize("url", ["ftp://10.0.0.5:8001", "http://", "http:///v1", "10.0.0.5:8001"])
def test_the_vllm_url_must_be_http_or_https_with_a_host(url):
    with pytest.raises(RegistryError) as e:
        Registry.from_bytes((HEAD + f"engine:\n  vllm_url: '{url}'\n").encode(), "registry.yaml")
    assert str(e.value).startswith(f"registry.yaml:4: engine.vllm_url: '{url}' is not an http(s) URL"), str(e.value)
    ok = Registry.from_bytes((HEAD + "engine:\n  vllm_url: ' https://vllm.internal/v1 '\n").encode()).model.engine
    assert ok.vllm_url == "https://vllm.internal/v1"  # stripped


def test_settings_changed_in_code_are_checked_like_the_file():
    from pydantic import ValidationError

    m = Registry.from_bytes(HEAD.encode()).model
    m.engine.max_loaded_adapters = 8
    with pytest.raises(ValidationError, match="max_loaded_adapters"):
        m.engine.max_loaded_adapters = 0
    with pytest.raises(ValidationError, match="scaledown_window"):
        m.serve.scaledown_window = 7200
    assert (m.engine.max_loaded_adapters, m.serve.scaledown_window) == (8, 300)
