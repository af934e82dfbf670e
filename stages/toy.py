"""Reads: params ``task``, ``toy``, ``evaluate``. Writes: the embedded reasoner's directory
(config, safetensors, character tokenizer, ``training.json`` with its held-out accuracy).
"""

import dataclasses
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from stages.corpus import word_sentences
from stages.generation import generate
from stages.models import encode_prompt, load_tokenizer
from stages.params import Params, ToyParams
from stages.tasks import Task, get_task
from stages.tasks.arithmetic import ALPHABET

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the task alphabet, with pad/bos/eos/unk."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    bos = vocab["<bos>"]  # the tokenizer adds BOS itself, as the model was trained with it
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def decoder_config(p: ToyParams, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """The config fields of a decoder shaped by ``p`` that any Llama-like family takes; vocab rounded up to 64."""
    return {
        "vocab_size": 64 * math.ceil(len(tokenizer) / 64),
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": p.hidden_size // p.num_heads,
        "max_position_embeddings": p.max_len,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_model(p: ToyParams, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """An untrained Qwen2 model shaped by ``p``."""
    config = Qwen2Config(**decoder_config(p, tokenizer), tie_word_embeddings=True, torch_dtype="float32")
    return Qwen2ForCausalLM(config)


def _batch(
    task: Task, tokenizer: PreTrainedTokenizerFast, p: ToyParams, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and labels [B, T] (-100 on prompt tokens, padding and unscored text)."""
    rows: list[tuple[list[int], list[int]]] = []
    for _ in range(p.batch_size):
        eos = [tokenizer.eos_token_id]
        if rng.random() < p.generic_fraction:
            ids = tokenizer.encode(word_sentences(p.generic_chars, rng.randrange(2**31)))
            ids = ids[: p.generic_chars]
            rows.append((ids, [-100] + ids[1:]))
        else:
            problem = task.problems(1, rng.randrange(2**31))[0]
            prompt = tokenizer.encode(problem.prompt)
            completion = tokenizer.encode(problem.solution, add_special_tokens=False) + eos
            rows.append((prompt + completion, [-100] * len(prompt) + completion))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return ids, labels


def train(task: Task, p: ToyParams, out: Path) -> dict[str, float]:
    """Train the tiny reasoner from seed ``p.seed`` and save it with its tokenizer to ``out``."""
    torch.manual_seed(p.seed)
    rng = random.Random(p.seed)
    tokenizer = build_tokenizer()
    model = build_model(p, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, p.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / p.steps))),
    )
    model.train()
    bar = tqdm(range(p.steps), desc="train toy", unit="step")
    loss_ema = float("nan")
    for _ in bar:
        ids, labels = _batch(task, tokenizer, p, rng)
        loss = model(input_ids=ids, attention_mask=ids != tokenizer.pad_token_id, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"final_loss": loss_ema, "steps": p.steps, "seed": p.seed}


def held_out_accuracy(p: Params, model: Path) -> float:
    """Greedy accuracy (HF backend) on ``toy.eval_problems`` problems unseen by rollout and evaluate."""
    task = get_task(p.task, p.benchmarks)
    tokenizer = load_tokenizer(str(model))
    problems = task.problems(p.toy.eval_problems, p.toy.seed + 1)
    sampling = dataclasses.replace(p.evaluate, backend="hf", temperature=0.0)
    prompts = [encode_prompt(tokenizer, pr.prompt, p.chat.system_prompt) for pr in problems]
    outs = generate(str(model), prompts, sampling, 1, p.vllm)
    return sum(
        task.is_correct(tokenizer.decode(g.token_ids, skip_special_tokens=True), pr.answer)
        for pr, (g,) in zip(problems, outs, strict=True)
    ) / len(problems)


def run(p: Params, out: Path) -> None:
    """Train, measure held-out accuracy, and write ``training.json`` beside the weights."""
    stats = train(get_task(p.task, p.benchmarks), p.toy, out)
    stats["held_out_accuracy"] = held_out_accuracy(p, out)
    (out / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("toy model: %s", stats)
