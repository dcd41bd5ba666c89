"""registry.yaml: strict models, located errors, path resolution, atomic round-trip saves, fingerprints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlrouter.core.errors import RegistryError, StorageError
from vlrouter.core.registry import AdapterEntry, Registry, fingerprint_labels

TEXT = """\
# team registry
base_model: Qwen/Qwen3-VL-8B-Instruct  # hub id
router:
  dir: runs/router
  pooling: mean
  layer: -1
  min_confidence: 0.25   # below: fallback
  fallback: base
train:
  epochs: 50
adapters:
  # first label
  - name: calendar
    plugin: vlrouter.adapters.calendar
    dataset: data/calendar/train.jsonl
    checkpoint: checkpoints/calendar-tasks
  - name: claim-window  # forms
    dataset: /abs/claim/train.jsonl
    checkpoint: checkpoints/claim-window

# modal settings follow
modal:
  gpu: H100
"""


@pytest.fixture
def reg_path(tmp_path: Path) -> Path:
    d = tmp_path / "project"
    d.mkdir()
    p = d / "registry.yaml"
    p.write_text(TEXT)
    return p


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def load_text(tmp_path: Path, text: str) -> Registry:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return Registry.load(p)


def error_of(tmp_path: Path, text: str) -> str:
    """The one-line message, with the file's folder cut off: ``r.yaml:LINE: field: problem (fix: ...)``."""
    with pytest.raises(RegistryError) as exc:
        load_text(tmp_path, text)
    msg = str(exc.value)
    assert msg.startswith(str(tmp_path / "r.yaml"))
    return msg.replace(f"{tmp_path}{os.sep}", "", 1)


# ---- loading --------------------------------------------------------------------------------


def test_loads_values_and_defaults(reg_path):
    reg = Registry.load(reg_path)
    assert reg.adapter_names == ["calendar", "claim-window"]
    assert reg.index_of("claim-window") == 1
    assert reg.model.router.min_confidence == 0.25
    assert reg.model.train.epochs == 50 and reg.model.train.batch_size == 8  # default
    assert reg.adapter("calendar").plugin == "vlrouter.adapters.calendar"
    assert reg.adapter("claim-window").plugin is None


def test_relative_paths_resolve_against_the_registry_folder(reg_path, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reg = Registry.load(reg_path)
    root = reg_path.parent
    assert reg.resolve("data/calendar/train.jsonl") == root / "data/calendar/train.jsonl"
    assert reg.resolve("/abs/claim/train.jsonl") == Path("/abs/claim/train.jsonl")
    assert reg.router_dir == root / "runs/router"
    # check_paths looks beside the registry, not in the cwd.
    (elsewhere / "data/calendar").mkdir(parents=True)
    (elsewhere / "data/calendar/train.jsonl").write_text("{}\n")
    with pytest.raises(RegistryError, match=r"adapters\[0\]\.dataset"):
        reg.check_paths(["calendar"])
    (root / "data/calendar").mkdir(parents=True)
    (root / "data/calendar/train.jsonl").write_text("{}\n")
    reg.check_paths(["calendar"])
    # A base_model that is an existing folder beside the registry resolves to it; hub ids stay.
    assert reg.base_model == "Qwen/Qwen3-VL-8B-Instruct"
    (root / "models/tiny").mkdir(parents=True)
    local = load_text(root, TEXT.replace("Qwen/Qwen3-VL-8B-Instruct", "models/tiny"))
    assert local.base_model == str(root / "models/tiny")


def test_registry_given_by_relative_path_resolves_from_its_folder(reg_path, monkeypatch):
    monkeypatch.chdir(reg_path.parent.parent)
    reg = Registry.load(Path("project/registry.yaml"))
    # absolute: the path means the same after a chdir (the README's `cd demo-run` steps)
    assert reg.resolve("data/x.jsonl") == reg_path.parent / "data/x.jsonl"
    assert reg.router_dir.is_absolute()


def test_check_paths_names_the_missing_dataset_with_its_line(reg_path):
    reg = Registry.load(reg_path)
    with pytest.raises(RegistryError) as exc:
        reg.check_paths()
    msg = str(exc.value)
    assert msg.startswith(f"{reg_path}:{line_of(TEXT, 'data/calendar/train.jsonl')}: adapters[0].dataset:")
    assert "fix:" in msg


# ---- saving ---------------------------------------------------------------------------------


def test_save_round_trips_bytes_and_comments(reg_path):
    reg = Registry.load(reg_path)
    reg.save()
    assert reg_path.read_text() == TEXT
    new = reg.add_adapter(AdapterEntry(name="provider-select", plugin="vlrouter.adapters.provider_select",
                                       dataset="data/provider-select/train.jsonl",
                                       checkpoint="checkpoints/provider-select"))
    assert reg_path.read_text() == TEXT  # add_adapter writes nothing
    new.save()
    text = reg_path.read_text()
    for line in TEXT.splitlines():
        assert line in text.splitlines(), line
    lines = text.splitlines()
    # The new entry sits after claim-window, and the comment heading `modal:` still heads it.
    assert lines.index("  - name: provider-select") > lines.index("  - name: claim-window  # forms")
    assert lines.index("# modal settings follow") == lines.index("modal:") - 1
    assert lines.index("  - name: provider-select") < lines.index("# modal settings follow")
    again = Registry.load(reg_path)
    assert again.adapter_names == ["calendar", "claim-window", "provider-select"]
    # ... and removing it gives back the original bytes.
    again.remove_adapter("provider-select").save()
    assert reg_path.read_text() == TEXT


def test_removing_the_last_entry_keeps_the_comments_after_it(reg_path):
    new = Registry.load(reg_path).remove_adapter("claim-window")
    text = new.to_text()
    assert "# modal settings follow\nmodal:" in text
    assert new.adapter_names == ["calendar"]


def test_removing_the_last_entry_keeps_the_comments_after_it_and_the_eol_comment_before(reg_path):
    reg_path.write_text(TEXT.replace("calendar-tasks", "calendar-tasks  # cal eol"))
    Registry.load(reg_path).remove_adapter("claim-window").save()
    text = reg_path.read_text()
    assert "    checkpoint: checkpoints/calendar-tasks  # cal eol\n\n# modal settings follow\nmodal:\n" in text
    assert Registry.load(reg_path).adapter_names == ["calendar"]


def test_save_is_atomic(reg_path, monkeypatch):
    os.chmod(reg_path, 0o640)
    reg = Registry.load(reg_path)
    new = reg.add_adapter(AdapterEntry(name="x", dataset="d", checkpoint="c"))

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="registry.yaml: cannot write: disk full"):  # one located line
        new.save()
    assert reg_path.read_text() == TEXT  # old bytes, never half of the new ones
    assert os.listdir(reg_path.parent) == ["registry.yaml"]  # the temp file is gone
    monkeypatch.undo()
    new.save()
    assert "name: x" in reg_path.read_text()
    assert reg_path.stat().st_mode & 0o777 == 0o640  # permissions kept
    assert os.listdir(reg_path.parent) == ["registry.yaml"]


def test_save_to_another_path(reg_path, tmp_path):
    out = tmp_path / "copy" / "registry.yaml"
    Registry.load(reg_path).save(out)
    assert out.read_text() == TEXT


# ---- fingerprints ---------------------------------------------------------------------------


def test_label_fingerprint_changes_with_order_and_set(reg_path, tmp_path):
    reg = Registry.load(reg_path)
    swapped_text = TEXT.replace("name: calendar", "name: TMP").replace("name: claim-window", "name: calendar") \
                       .replace("name: TMP", "name: claim-window")
    swapped = load_text(tmp_path, swapped_text)
    assert swapped.adapter_names == ["claim-window", "calendar"]
    assert reg.label_fingerprint() != swapped.label_fingerprint()
    assert reg.label_fingerprint() == fingerprint_labels(["calendar", "claim-window"])
    assert reg.label_fingerprint() == Registry.load(reg_path).label_fingerprint()  # stable
    added = reg.add_adapter(AdapterEntry(name="provider-select", dataset="d", checkpoint="c"))
    assert added.label_fingerprint() != reg.label_fingerprint()
    # The full fingerprint also tracks datasets, pooling and layer; the label one does not.
    moved = load_text(tmp_path, TEXT.replace("data/calendar/train.jsonl", "data/cal2.jsonl"))
    assert moved.label_fingerprint() == reg.label_fingerprint()
    assert moved.fingerprint() != reg.fingerprint()
    last = load_text(tmp_path, TEXT.replace("pooling: mean", "pooling: last"))
    assert last.fingerprint() != reg.fingerprint()


# ---- validation and located errors -------------------------------------------------------------


@pytest.mark.parametrize("value", ["-0.1", "1.5", "2"])
def test_min_confidence_outside_unit_interval_is_an_error(tmp_path, value):
    text = TEXT.replace("min_confidence: 0.25", f"min_confidence: {value}")
    msg = error_of(tmp_path, text)
    assert f"r.yaml:{line_of(text, 'min_confidence')}: router.min_confidence:" in msg
    assert "fix:" in msg


@pytest.mark.parametrize("value", ["0", "1", "0.0", "1.0"])
def test_min_confidence_bounds_are_allowed(tmp_path, value):
    assert load_text(tmp_path, TEXT.replace("min_confidence: 0.25", f"min_confidence: {value}"))


LINE_CASES = {
    # id: (old, new, needle for the expected line, field path in the message)
    "unknown-top-key": ("train:\n", "trian:\n  epochs: 1\ntrain:\n", "trian:", "trian"),
    "unknown-adapter-key": ("    checkpoint: checkpoints/claim-window", "    checkpoint: checkpoints/claim-window\n"
                            "    weight: 2", "weight: 2", "adapters[1].weight"),
    "typo-beats-missing": ("    dataset: /abs/claim/train.jsonl", "    datset: /abs/claim/train.jsonl",
                           "datset:", "adapters[1].datset"),
    "bad-type": ("epochs: 50", "epochs: lots", "epochs: lots", "train.epochs"),
    "bad-literal": ("pooling: mean", "pooling: first", "pooling: first", "router.pooling"),
    "bad-name": ("name: claim-window", "name: Claim_Window", "Claim_Window", "adapters[1].name"),
    "duplicate-name": ("name: claim-window", "name: calendar", "name: calendar  # forms", "adapters[1].name"),
    "fallback-unknown": ("fallback: base", "fallback: provider-select", "fallback:", "router.fallback"),
    "missing-base-model": ("base_model: Qwen/Qwen3-VL-8B-Instruct  # hub id\n", "", None, "base_model"),
    "missing-in-entry": ("    dataset: /abs/claim/train.jsonl\n", "", "name: claim-window", "adapters[1].dataset"),
}


@pytest.mark.parametrize("case", list(LINE_CASES), ids=list(LINE_CASES))
def test_errors_name_the_field_and_the_right_line(tmp_path, case):
    old, new, needle, field = LINE_CASES[case]
    text = TEXT.replace(old, new, 1)
    assert text != TEXT
    msg = error_of(tmp_path, text)
    where = f"r.yaml:{line_of(text, needle)}: " if needle else "r.yaml: "
    assert msg.startswith(where + field + ":"), msg
    assert "\n" not in msg and "(fix: " in msg


def test_unknown_key_suggests_the_close_one(tmp_path):
    msg = error_of(tmp_path, TEXT.replace("    dataset: /abs", "    datset: /abs"))
    assert "unknown key 'datset'" in msg and "'dataset'" in msg


@pytest.mark.parametrize("text,line,problem", [
    ("base_model: x\nrouter:\n  dir: [a\n  pooling: mean\n", 4, "YAML syntax error: expected ',' or ']', but got ':'"),
    ("base_model: x\n\tadapters: []\n", 2, "YAML syntax error"),
    ("- a\n- b\n", 1, "top level is a list"),
    ("42\n", 1, "top level is a int"),
])
def test_yaml_level_errors_have_a_line(tmp_path, text, line, problem):
    msg = error_of(tmp_path, text)
    assert msg.startswith(f"r.yaml:{line}: ") and problem in msg


@pytest.mark.parametrize("text", ["", "   \n\n", "# only a comment\n"])
def test_empty_files_are_errors(tmp_path, text):
    msg = error_of(tmp_path, text)
    assert msg.startswith("r.yaml: ") and ("empty" in msg or "no YAML document" in msg)


def test_empty_adapters_list_is_fine_and_can_grow(tmp_path):
    for body in ("adapters: []\n", "adapters:\n"):
        reg = load_text(tmp_path, "base_model: m\n" + body)
        assert reg.adapter_names == []
        new = reg.add_adapter(AdapterEntry(name="calendar", dataset="d", checkpoint="c"))
        assert new.adapter_names == ["calendar"]
        assert "  - name: calendar\n" in new.to_text()


def test_edits_are_validated_before_anything_is_written(reg_path):
    reg = Registry.load(reg_path)
    with pytest.raises(RegistryError, match=r"adapters\[0\]\.name: adapter 'calendar' is already registered"):
        reg.add_adapter(AdapterEntry(name="calendar", dataset="d", checkpoint="c"))
    with pytest.raises(RegistryError, match=r"no adapter named 'calender'; did you mean 'calendar'"):
        reg.remove_adapter("calender")
    fb = load_text(reg_path.parent, TEXT.replace("fallback: base", "fallback: calendar"))
    with pytest.raises(RegistryError, match=r"router\.fallback"):
        fb.remove_adapter("calendar")
    assert reg_path.read_text() == TEXT


def test_adapter_entry_rejects_bad_names():
    with pytest.raises(ValueError, match=r"\[a-z0-9\]"):
        AdapterEntry(name="-leading-dash", dataset="d", checkpoint="c")


def test_the_example_registry_at_the_repo_root_loads_and_names_real_plugins():
    from vlrouter.plugins.manager import collect_adapters, get_plugin_manager

    example = Path(__file__).resolve().parents[2] / "registry.yaml"
    reg = Registry.load(example)
    assert reg.model.base_model == "Qwen/Qwen3-VL-8B-Instruct"
    assert reg.adapter_names == ["calendar", "claim-window", "provider-select"]
    specs = collect_adapters(get_plugin_manager(reg, entry_points=False))
    for a in reg.adapters:  # each entry agrees with the plugin that declares it
        assert specs[a.name].plugin == a.plugin and specs[a.name].checkpoint == a.checkpoint
    assert reg.to_text() == example.read_text()  # a load/save round trip keeps every comment


# ---- hardening (issue #12) ------------------------------------------------------------------

def _alias_bomb(levels: int) -> str:
    lines = ['base_model: m', 'a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [8, 12], ids=["alias-bomb", "alias-bomb-next-level"])
def test_yaml_alias_bombs_are_refused_in_milliseconds(tmp_path, levels):
    import time

    t0 = time.perf_counter()
    msg = error_of(tmp_path, _alias_bomb(levels))  # 9**9 values was 38 s and 1.2 GB, the next a MemoryError
    assert "YAML aliases expand to more than 100,000 values" in msg and "(fix: " in msg
    assert time.perf_counter() - t0 < 2
    # a few aliases are fine: they are YAML
    reg = load_text(tmp_path, TEXT.replace("train:\n  epochs: 50", "train: &t\n  epochs: 50"))
    assert reg.model.train.epochs == 50


def test_a_folder_as_registry_uses_its_registry_yaml_or_says_so(reg_path, tmp_path):
    assert Registry.load(reg_path.parent).path == reg_path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RegistryError, match="is a folder without a registry.yaml"):
        Registry.load(empty)


def test_a_fifo_as_registry_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "registry.yaml"
    os.mkfifo(fifo)
    with pytest.raises(RegistryError, match="FIFO"):
        Registry.load(fifo)


@pytest.mark.parametrize("name,problem", [
    ("base", "is reserved"), ("error", "is reserved"), ("auto", "is reserved"),
    ("a", "part of peft's parameter prefix 'lora_'"), ("lora", "part of peft's parameter prefix"),
], ids=["base", "error", "auto", "a", "lora"])
def test_adapter_names_that_collide_with_keywords_or_peft_are_refused(tmp_path, name, problem):
    msg = error_of(tmp_path, TEXT.replace("name: calendar", f"name: {name}"))
    assert "adapters[0].name" in msg and problem in msg


@pytest.mark.parametrize("line,field", [
    ("epochs: 99999999999999999999999", "train.epochs"),
    ("seed: 99999999999999999999999", "train.seed"),
    ("head_hidden: 10000000", "train.head_hidden"),
    ("lr: .inf", "train.lr"),
    ("lr: .nan", "train.lr"),
    ("workers: 0", "train.workers"),
], ids=["epochs-overflow", "seed-overflow", "head-hidden-huge", "lr-inf", "lr-nan", "workers-zero"])
def test_out_of_range_train_values_are_located_errors(tmp_path, line, field):
    msg = error_of(tmp_path, TEXT.replace("epochs: 50", line))
    assert field in msg and "(fix: " in msg


def test_workers_default_to_auto_chosen_from_the_machine(tmp_path):
    from vlrouter.core.options import TrainOptions, auto_workers, resolve_options

    assert auto_workers(2) == (1, "auto: 2 CPU cores; worker processes pay off from 4 cores")
    assert auto_workers(4)[0] == 3 and auto_workers(16)[0] == 4
    opts = resolve_options(load_text(tmp_path, TEXT))
    assert (opts.workers, opts.workers_note) == auto_workers()
    assert resolve_options(load_text(tmp_path, TEXT.replace("epochs: 50", "workers: 3"))).workers == 3
    assert isinstance(TrainOptions(base_model="m").workers, int)


def test_a_missing_local_base_model_is_refused_not_looked_up_on_the_hub(tmp_path):
    from vlrouter.core.encoder import load_processor
    from vlrouter.core.errors import ModelLoadError
    from vlrouter.core.options import resolve_options
    from vlrouter.core.recipe import check_work_dirs

    (tmp_path / "models").mkdir()
    for value in ("models/tiny-qwen3-vl", "./tiny", "/nonexistent/qwen"):
        reg = load_text(tmp_path, TEXT.replace("Qwen/Qwen3-VL-8B-Instruct", value))
        assert reg.base_model_is_local() and Path(reg.base_model).is_absolute()
        opts = resolve_options(reg)  # options resolve (build-dataset needs no model) …
        with pytest.raises(ModelLoadError, match="local base model folder not found"):
            load_processor(opts.base_model)  # … but no loader hands it to the Hub
        with pytest.raises(RegistryError) as e:
            check_work_dirs(reg, opts)  # and a run stops before any work, naming the line
        assert f"{tmp_path / 'r.yaml'}:2: base_model: local base model folder not found" in str(e.value)
    assert not load_text(tmp_path, TEXT).base_model_is_local()  # a hub id stays a hub id


@pytest.mark.parametrize("old,new,problem,fix", [
    ("name: claim-window", "name: calendar", "adapters[1].name: duplicate adapter name 'calendar' (also adapters[0])",
     "(fix: rename or remove one of the two entries)"),
    ("pooling: mean", "pooling: 3", "router.pooling.str: Input should be a valid string",
     "(fix: write auto, one of mean, "),
], ids=["duplicate-name", "pooling-not-a-string"])
def test_errors_come_with_the_fix_for_that_kind_of_mistake(tmp_path, old, new, problem, fix):
    msg = error_of(tmp_path, TEXT.replace(old, new, 1))
    assert problem in msg and fix in msg, msg


@pytest.mark.parametrize("line,field,limit", [
    ("batch_size: 1000001", "train.batch_size", "1000000"),
    ("patience: 1000001", "train.patience", "1000000"),
], ids=["batch-size", "patience"])
def test_train_values_just_over_their_limit_are_refused(tmp_path, line, field, limit):
    msg = error_of(tmp_path, TEXT.replace("epochs: 50", line))
    assert f"{field}: Input should be less than or equal to {limit}" in msg
    assert load_text(tmp_path, TEXT.replace("epochs: 50", line.replace("1000001", "1000000"))) is not None


def test_modal_cpu_shards_just_over_the_limit_is_refused(tmp_path):
    msg = error_of(tmp_path, TEXT.replace("gpu: H100", "cpu_shards: 10001"))
    assert "modal.cpu_shards: Input should be less than or equal to 10000" in msg
    assert load_text(tmp_path, TEXT.replace("gpu: H100", "cpu_shards: 10000")).model.modal.cpu_shards == 10000


def test_adapter_names_are_at_most_64_characters(tmp_path):
    assert load_text(tmp_path, TEXT.replace("name: calendar", "name: " + "a" * 64)).adapter_names[0] == "a" * 64
    msg = error_of(tmp_path, TEXT.replace("name: calendar", "name: " + "a" * 65))
    assert f"adapters[0].name: adapter name '{'a' * 65}' is longer than 64 characters" in msg


def test_a_path_typed_outside_the_registry_folder_is_stored_relative_to_it(reg_path, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reg = Registry.load(reg_path)
    assert reg.relative_path("data/x.jsonl") == "../elsewhere/data/x.jsonl"
    assert reg.resolve(reg.relative_path("data/x.jsonl")).resolve() == (elsewhere / "data/x.jsonl").resolve()


def test_unknown_names_suggest_at_most_three_close_ones():
    from vlrouter.core.registry import suggest

    assert suggest("calendar", ["calendar1234", "calendar12", "calendar123", "calendar1"]) == \
        "; did you mean 'calendar1', 'calendar12', 'calendar123'?"  # the closest first
    assert suggest("calendar", ["zzz"]) == ""


def test_a_new_registry_without_adapters_loads_with_an_empty_list(tmp_path):
    from vlrouter.core.registry import new_registry_text

    text = new_registry_text("Qwen/Qwen3-VL-8B-Instruct", [])
    assert text.startswith("# vlrouter registry:") and text.endswith("\nadapters: []\n")
    reg = load_text(tmp_path, text)
    assert reg.model.base_model == "Qwen/Qwen3-VL-8B-Instruct" and reg.adapter_names == []


# Every bounded router:/train:/modal: number: (section, key, lowest allowed, highest allowed, just below, just above).
REGISTRY_LIMITS = [
    ("router", "layer", -10_000, 10_000, -10_001, 10_001),
    ("router", "max_prompt_tokens", 1, 1_000_000, 0, 1_000_001),
    ("train", "epochs", 1, 1_000_000, 0, 1_000_001),
    ("train", "batch_size", 1, 1_000_000, 0, 1_000_001),
    ("train", "patience", 1, 1_000_000, 0, 1_000_001),
    ("train", "eval_every", 1, 1_000_000, 0, 1_000_001),
    ("train", "val_fraction", 0.001, 0.999, 0, 1),
    ("train", "seed", 0, 2**63 - 1, -1, 2**63),  # what torch.manual_seed and numpy accept
    ("train", "head_hidden", 1, 65_536, 0, 65_537),
    ("train", "cv_folds", 2, 100, 1, 101),
    ("train", "train_samples", 1, 1_000_000_000, 0, 1_000_000_001),
    ("train", "eval_samples", 0, 1_000_000_000, -1, 1_000_000_001),
    ("train", "workers", 1, 256, 0, 257),
    ("train", "embed_batch_size", 1, 65_536, 0, 65_537),
    ("modal", "cpu_shards", 1, 10_000, 0, 10_001),
]


@pytest.mark.parametrize(("section", "key", "low", "high", "under", "over"), REGISTRY_LIMITS,
                         ids=[x[1] for x in REGISTRY_LIMITS])
def test_each_number_takes_exactly_its_documented_range(section, key, low, high, under, over):
    def text(value):
        return f"base_model: Qwen/Qwen3-VL-8B-Instruct\nadapters: []\n{section}:\n  {key}: {value}\n"

    for ok in (low, high):
        assert getattr(getattr(Registry.from_bytes(text(ok).encode()).model, section), key) == ok
    for bad in (under, over):
        with pytest.raises(RegistryError) as e:
            Registry.from_bytes(text(bad).encode(), "registry.yaml")
        assert str(e.value).startswith(f"registry.yaml:4: {section}.{key}"), str(e.value)
        assert "(fix: " in str(e.value)


@pytest.mark.parametrize(("body", "expected"), [
    ("router:\n  1: x\n", "registry.yaml:4: router.1: unknown key '1' (fix: remove it; known keys: dir, "),
    ("router:\n  dir: r\n  true: x\n", "registry.yaml:5: router.True: unknown key 'True' (fix: remove it; "),
    ("2: x\n", "registry.yaml:3: 2: unknown key '2' (fix: remove it; known keys: base_model, "),
], ids=["number", "boolean", "top-level-number"])
def test_a_key_yaml_reads_as_a_number_or_boolean_is_named_with_its_own_line(body, expected):
    """YAML reads ``1:`` as the number 1 and ``true:`` as True: still typo'd keys, named as such, at their line."""
    with pytest.raises(RegistryError) as e:
        Registry.from_bytes(f"base_model: m\nadapters: []\n{body}".encode(), "registry.yaml")
    assert str(e.value).startswith(expected), str(e.value)


@pytest.mark.parametrize("value", [-10_001, 10_001, "last", "true", 1.5])
def test_a_bad_layer_is_one_message_saying_what_a_layer_is(value):
    with pytest.raises(RegistryError) as e:
        Registry.from_bytes(f"base_model: m\nadapters: []\nrouter:\n  layer: {value}\n".encode(), "registry.yaml")
    assert str(e.value).startswith("registry.yaml:4: router.layer: layer must be auto or a hidden-state index (an "
                                   "integer, -1 = the last layer), got "), str(e.value)
    assert "(+" not in str(e.value)  # one error, not one per alternative of the union


@pytest.mark.parametrize(("pooling", "views"), [("auto", None), ("mean", ["mean"]), ("[last, mean]", ["last", "mean"])])
def test_router_views_are_none_for_auto_else_the_listed_views_in_order(pooling, views):
    router = Registry.from_bytes(f"base_model: m\nadapters: []\nrouter:\n  pooling: {pooling}\n".encode()).model.router
    assert router.views == views
    assert router.pooling == (pooling if views is None or len(views) == 1 else views)


@pytest.mark.parametrize(("value", "ok"), [("auto", True), (0.5, True), (1e-6, True), (3, True), (0, False),
                                           (-1.0, False), (".inf", False), ("strong", False)])
def test_train_l2_is_auto_or_a_positive_finite_number(value, ok):
    text = f"base_model: m\nadapters: []\ntrain:\n  l2: {value}\n".encode()
    if ok:
        assert Registry.from_bytes(text).model.train.l2 == value
    else:
        with pytest.raises(RegistryError, match=r"^registry.yaml:4: train.l2"):
            Registry.from_bytes(text, "registry.yaml")


def test_a_registry_over_one_mib_is_refused_before_it_is_read(tmp_path):
    head = b"base_model: m\nadapters: []\n"
    p = tmp_path / "registry.yaml"
    p.write_bytes(head + b"#" * ((1 << 20) + 1 - len(head)))
    with pytest.raises(RegistryError, match=r"1,048,577 bytes is far too large for a registry \(limit 1,048,576\) "
                                            r"\(fix: point --registry at registry.yaml\)"):
        Registry.load(p)
    p.write_bytes(head + b"#" * ((1 << 19) + 1 - len(head)) + b"\n")  # half a MiB of comments: still a registry
    assert Registry.load(p).model.base_model == "m"
