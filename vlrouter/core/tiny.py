"""Build a tiny random Qwen3-VL (model + tokenizer + image processor + chat template) offline.

There is no Hugging Face Hub here, nor in CI. Tests, the demo and the benchmarks call
:func:`build_tiny_model` and then load the result through exactly the code a user runs
with ``Qwen/Qwen3-VL-8B-Instruct`` (:func:`vlrouter.core.encoder.load_base_model`), so
the ``from_pretrained`` path is always exercised.

The tokenizer is byte-level BPE with no merges (every byte is a token) plus Qwen's
special tokens, built with the ``tokenizers`` library. The saved processor files have
the same shape as the real checkpoint's (``processor_class: Qwen3VLProcessor``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from vlrouter.core.encoder import image_only_processor_class, quiet_loading
from vlrouter.core.errors import InputError, located

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The same message layout as Qwen3-VL's own template for image+text user turns:
# <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>TEXT<|im_end|>\n
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Architecture knobs. ``PRESETS`` holds the named ones."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    # Image budget in pixels (Qwen's min_pixels / max_pixels). 16px patches, 2x2 merge:
    # 224*224 pixels -> at most 196 patches -> 49 image tokens.
    min_pixels: int = 32 * 32
    max_pixels: int = 224 * 224
    seed: int = 0


PRESETS: dict[str, TinySpec] = {
    # ~0.2M parameters: unit tests, the demo.
    "tiny": TinySpec(),
    # ~2M parameters: the offline demo. Wider than "tiny" because random features
    # separate the demo's screenshots better with more dimensions (0.82 vs 0.76 val acc).
    "demo": TinySpec(hidden_size=256, heads=4, kv_heads=2, intermediate_size=512,
                     vision_hidden_size=128, vision_depth=2, vision_heads=4),
    # ~100M parameters: benchmarks ("a ~100M-parameter random Qwen3-VL").
    "100m": TinySpec(
        hidden_size=768,
        layers=12,
        heads=12,
        kv_heads=4,
        intermediate_size=2560,
        vision_hidden_size=384,
        vision_depth=4,
        vision_heads=6,
    ),
}


def _build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=32768,
    )


def build_tiny_model(out_dir: str | Path, spec: TinySpec | str = "tiny") -> Path:
    """Write a random Qwen3-VL + processor into ``out_dir`` (created) and return it.

    The folder loads with ``AutoModelForImageTextToText.from_pretrained`` and
    :func:`vlrouter.core.encoder.load_processor` like a hub checkpoint.
    """
    import torch
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if isinstance(spec, str):
        if spec not in PRESETS:
            raise InputError(located(None, "preset", f"unknown tiny-model preset {spec!r}",
                                     fix=f"one of {', '.join(PRESETS)}"))
        spec = PRESETS[spec]
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # e.g. a real model's folder: never overwritten
        raise InputError(located(out, None, "already exists and is not an empty folder; nothing was written",
                                 fix="choose a new folder for the tiny model"))
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec.hidden_size // spec.heads
    # mrope sections split head_dim/2 rotary frequencies over (t, h, w).
    half = head_dim // 2
    t_sec = half - 2 * (half * 3 // 8)
    mrope = [t_sec, half * 3 // 8, half * 3 // 8]
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 500000.0,
                "mrope_section": mrope,
                "mrope_interleaved": True,
            },
            max_position_embeddings=32768,
            pad_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            bos_token_id=None,
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_hidden_size * 2,
            num_heads=spec.vision_heads,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=spec.hidden_size,
            num_position_embeddings=256,
            deepstack_visual_indexes=[max(0, spec.vision_depth // 2 - 1)],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.do_sample = False
    with quiet_loading():  # no "Writing model shards" bar: the library never prints
        model.save_pretrained(out)

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
    )
    processor = image_only_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    # Make the saved files look like a hub Qwen3-VL checkpoint's.
    for name in ("processor_config.json", "preprocessor_config.json"):
        p = out / name
        if p.exists():
            data = json.loads(p.read_text())
            if "processor_class" in data:
                data["processor_class"] = "Qwen3VLProcessor"
            p.write_text(json.dumps(data, indent=2))
    (out / "vlrouter_tiny.json").write_text(json.dumps({"spec": asdict(spec)}, indent=2))
    return out


def count_parameters(folder: str | Path) -> int:
    """Sum of tensor sizes from the safetensors headers of a model folder (no torch import, no weights read)."""
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total
