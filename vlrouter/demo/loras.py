"""Demo LoRA adapters: made with peft for the demo's base model and trained briefly.

Real adapters are trained elsewhere (the seed's calendar-tasks, claim-window, ...);
the demo needs some that exist offline in seconds. Each is a LoRA on the language
model's attention and MLP projections, trained with teacher forcing on its task's
(screenshot, instruction) -> action text pairs, so that what it generates parses as
an action most of the time. :func:`train_demo_lora` reports that parse rate.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from vlrouter.core.encoder import build_inputs, build_messages, load_base_model, load_processor
from vlrouter.core.images import open_image
from vlrouter.core.progress import Progress, progress_or_null

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head"


@dataclass
class LoraReport:
    adapter: str
    steps: int
    final_loss: float
    parse_rate: float
    checked: int


def _read_pairs(dataset: Path) -> list[tuple[Path, str, str]]:
    pairs = []
    for line in dataset.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        human = next(t["value"] for t in rec["conversations"] if t["from"] == "human")
        gpt = next(t["value"] for t in rec["conversations"] if t["from"] == "gpt")
        pairs.append((dataset.parent / rec["image"], human.removeprefix("<image>\n"), gpt))
    return pairs


def _batch_with_labels(processor, images, prompts, answers):
    """Prompt (chat template, generation prompt) + answer + <|im_end|>; loss on the answer only."""
    import torch

    eos = "<|im_end|>"
    texts = [
        processor.apply_chat_template(build_messages(img, p), tokenize=False, add_generation_prompt=True) + a + eos
        for img, p, a in zip(images, prompts, answers)
    ]
    batch = processor(text=texts, images=list(images), return_tensors="pt", padding=True, padding_side="left")
    labels = torch.full_like(batch["input_ids"], -100)
    for i, a in enumerate(answers):
        n = len(processor.tokenizer(a + eos, add_special_tokens=False)["input_ids"])
        labels[i, -n:] = batch["input_ids"][i, -n:]
    return batch, labels


def train_demo_lora(
    base_model: str,
    dataset: str | Path,
    out_dir: str | Path,
    *,
    adapter: str,
    steps: int = 60,
    batch_size: int = 8,
    lr: float = 3e-3,
    rank: int = 8,
    seed: int = 0,
    check: int = 12,
    parse=None,
    progress: Progress | None = None,
) -> LoraReport:
    """Train a LoRA for ``adapter`` on ``dataset`` and save it (``adapter_config.json`` + safetensors).

    ``parse(text) -> UIAction | None`` scores the parse rate on ``check`` samples.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    progress = progress_or_null(progress)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = load_processor(base_model)
    model = load_base_model(base_model, device="cpu", dtype="float32")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        base_model_name_or_path=base_model)
    peft_model = get_peft_model(model, config)  # "default": save_pretrained writes into out_dir itself
    pairs = _read_pairs(Path(dataset))
    images = {p: open_image(p) for p, _, _ in pairs}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    loss_value = float("nan")
    with progress.task(f"training LoRA {adapter}", total=steps) as t:
        for _ in range(steps):
            chunk = rng.sample(pairs, min(batch_size, len(pairs)))
            batch, labels = _batch_with_labels(processor, [images[p] for p, _, _ in chunk],
                                               [q for _, q, _ in chunk], [a for _, _, a in chunk])
            out = peft_model(**batch, labels=labels)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            loss_value = float(out.loss.detach())
            t.advance()
    peft_model.eval()
    ok = 0
    sample = pairs[:check]
    if parse is not None and sample:
        with torch.inference_mode():
            batch = build_inputs(processor, [images[p] for p, _, _ in sample], [q for _, q, _ in sample])
            gen = peft_model.generate(**batch, max_new_tokens=24, do_sample=False)
        texts = processor.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        ok = sum(parse(t) is not None for t in texts)
    out = Path(out_dir)
    # lm_head is a LoRA target, but only the LoRA weights change: do not copy the full lm_head
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return LoraReport(adapter=adapter, steps=steps, final_loss=loss_value,
                      parse_rate=ok / len(sample) if sample and parse else 0.0, checked=len(sample))
