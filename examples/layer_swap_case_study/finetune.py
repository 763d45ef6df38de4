"""The experts: a plain PyTorch fine-tuning loop (the experiment's setup; `surgery` itself never trains).

Full fine-tuning of every transformer layer and the final norm, AdamW, linear warm-up then linear decay, fp32.
The tied input/output embedding stays frozen: it is a fifth of SmolLM2-135M's weights, shared by input and
output, and the layer swap of the paper is about the transformer layers. The loss is taken only where a label
is given (the answer of a math problem; every token of a language text), and the output projection is computed
only at those positions, which saves most of its cost on the short math answers.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

IGNORE = -100


def lm_examples(tokenizer, texts: list[str], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Language modelling: the texts joined by newlines and EOS-free, cut into chunks of ``seq_len`` tokens,
    every token a label."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n", add_special_tokens=False).input_ids)
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return [(chunk, list(chunk)) for chunk in chunks]


def sft_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Supervised pairs (prompt, completion): labels only on the completion and the EOS that ends it."""
    out = []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        c = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        out.append((p + c, [IGNORE] * len(p) + c))
    return out


def _batch(examples, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    return ids, labels, mask


def loss_of(model, ids, labels, mask):
    """Mean cross-entropy of the next token at labelled positions; logits only where they are needed."""
    import torch.nn.functional as F

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def finetune(base_dir, out_dir, examples, *, steps: int, batch_size: int, lr: float, seed: int,
             device: str = "cpu", warmup: float = 0.1, log=print, pace=lambda: None) -> dict:
    """Fine-tune the checkpoint ``base_dir`` on ``examples`` [(ids, labels)] for ``steps`` steps of
    ``batch_size`` examples (drawn in a seeded shuffled order, epoch after epoch) and save the result to
    ``out_dir`` as safetensors (float32) with the base's tokenizer. ``pace`` is called every 5 steps (the
    caller may change torch's thread count). Returns the loss curve and timings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    n_warm = max(1, int(warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / n_warm, max(0.0, (steps - s) / max(1, steps - n_warm))))
    order: list[int] = []
    losses, tokens, start = [], 0, time.perf_counter()
    for step in range(steps):
        if step % 5 == 0:
            pace()
        if len(order) < batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order.extend(more)
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        ids, labels, mask = (t.to(device) for t in _batch(batch, tokenizer.pad_token_id or 0))
        loss = loss_of(model, ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int(mask.sum())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"  step {step + 1}/{steps} loss {losses[-1]:.3f} ({tokens / (time.perf_counter() - start):.0f} tok/s)")
    seconds = time.perf_counter() - start
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    first = sum(losses[:max(1, steps // 10)]) / max(1, steps // 10)
    last = sum(losses[-max(1, steps // 10):]) / max(1, steps // 10)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "examples": len(examples), "tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds, "loss_first": first, "loss_last": last,
            "perplexity_drop": math.exp(first - last)}
