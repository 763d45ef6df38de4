"""Built-in evaluators: perplexity and bits per byte, greedy generation, multiple choice.

    perplexity(model, tokenizer, ["a document", ...])          -> {"perplexity", "bits_per_byte"}
    generation(model, tokenizer, [{"prompt", "answer"}, ...])   -> {"exact_match", "numeric_match"}
    multiple_choice(model, tokenizer, [{"prompt", "choices", "label"}, ...]) -> {"acc", "acc_norm"}

Log-likelihoods follow lm-evaluation-harness, so the numbers are comparable with it: a document
is scored token by token after one prefix token (BOS, else EOS); a choice is scored as the
continuation ``" " + choice`` of the prompt, split from the encoding of the whole string; acc_norm
divides by the choice's length in characters.
"""

from __future__ import annotations

import math
import re
import string
from decimal import Decimal, InvalidOperation

from surgery.errors import SurgeryError

DEFAULT_MAX_LENGTH = 2048
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def max_length_of(model, max_length: int | None = None) -> int:
    """Tokens per window: ``max_length``, else the model's position limit capped at 2048."""
    if max_length:
        return max_length
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return min(limit or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)


def prefix_token(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for a sequence of ``n`` tokens whose positions 1..n-1 are
    scored, as in transformers' "perplexity of fixed-length models": windows of at most ``window``
    tokens start every ``stride`` tokens, and each scores the tokens the previous one did not reach,
    so every token is scored once, after the first window with ``window - stride`` tokens of context
    at least."""
    if not 0 < stride < window:
        raise SurgeryError(f"stride {stride}: must be in 1..{window - 1} for windows of {window} tokens")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


def score_tokens(model, sequences: list[tuple[list[int], int]], *, batch_size: int = 8, bar=None) -> list[float]:
    """For each (ids, k): the summed log-probability of the last ``k`` tokens of ``ids`` given the
    tokens before them. Batched by length (longest first), right-padded."""
    import torch

    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    out = [0.0] * len(sequences)
    device = model.device
    for a in range(0, len(order), batch_size):
        batch = [sequences[i] for i in order[a:a + batch_size]]
        width = len(batch[0][0])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (seq, _) in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, (seq, k) in enumerate(batch):
            n = len(seq)
            logprobs = torch.log_softmax(logits[row, n - k - 1:n - 1].float(), dim=-1)
            target = torch.tensor(seq[n - k:], device=logprobs.device).unsqueeze(1)
            out[order[a + row]] = float(logprobs.gather(1, target).sum())
        if bar is not None:
            bar.update(len(batch))
    return out


def perplexity(model, tokenizer, docs: list[str], *, batch_size: int = 8, max_length: int | None = None,
               stride: int | None = None, bar=None) -> dict[str, float]:
    """Corpus perplexity (exp of the mean negative log-likelihood per token) and bits per byte
    (total negative log-likelihood in bits over the documents' UTF-8 bytes), with a sliding window
    of ``max_length`` tokens moving by ``stride`` (default half a window) over long documents."""
    return perplexity_of(perplexity_sums(model, tokenizer, docs, batch_size=batch_size, max_length=max_length,
                                         stride=stride, bar=bar))


def perplexity_of(sums: dict) -> dict[str, float]:
    """perplexity and bits_per_byte from the sums of ``perplexity_sums`` (of one or several parts of a corpus)."""
    nll = sums["nll"]
    return {"perplexity": math.exp(nll / max(sums["tokens"], 1)),
            "bits_per_byte": nll / (math.log(2) * max(sums["bytes"], 1))}


def perplexity_sums(model, tokenizer, docs: list[str], *, batch_size: int = 8, max_length: int | None = None,
                    stride: int | None = None, bar=None) -> dict[str, float]:
    """{nll, tokens, bytes}: the summed negative log-likelihood of the documents, the tokens it scores and the
    documents' UTF-8 bytes (parts of a corpus add up: a search's growing subsets)."""
    window = max_length_of(model, max_length)
    stride = stride or max(1, window // 2)
    prefix = prefix_token(tokenizer)
    sequences, n_tokens, n_bytes = [], 0, 0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False).input_ids
        ids = ids if prefix is None else [prefix] + ids
        n_bytes += len(doc.encode("utf-8"))
        for begin, end, first in sliding_windows(len(ids), window, stride) if len(ids) > 1 else []:
            sequences.append((ids[begin:end], end - first))
            n_tokens += end - first
    if bar is not None:
        bar.reset(total=len(sequences))
    nll = -sum(score_tokens(model, sequences, batch_size=batch_size, bar=bar))
    return {"nll": nll, "tokens": n_tokens, "bytes": n_bytes}


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context move to the continuation; the
    continuation's tokens are the whole string's tokens after the context's."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [prefix_token(tokenizer)], tokenizer(continuation).input_ids
    whole = tokenizer(context + continuation).input_ids
    context_ids = tokenizer(context).input_ids
    return context_ids, whole[len(context_ids):]


def choice_loglikelihoods(model, tokenizer, items: list[dict], *, batch_size: int = 8,
                          max_length: int | None = None, bar=None) -> list[list[float]]:
    """Log-likelihood of every choice of every item, as the continuation ``" " + choice``."""
    window = max_length_of(model, max_length)
    sequences, shape = [], []
    for item in items:
        shape.append(len(item["choices"]))
        for choice in item["choices"]:
            context, continuation = encode_pair(tokenizer, item["prompt"], " " + choice)
            ids = (context + continuation)[-(window + 1):]
            sequences.append((ids, len(continuation)))
    if bar is not None:
        bar.reset(total=len(sequences))
    flat = iter(score_tokens(model, sequences, batch_size=batch_size, bar=bar))
    return [[next(flat) for _ in range(n)] for n in shape]


def multiple_choice(model, tokenizer, items: list[dict], *, batch_size: int = 8, max_length: int | None = None,
                    bar=None) -> dict[str, float]:
    """Accuracy (highest log-likelihood is the label) and acc_norm (log-likelihood per character)."""
    lls = choice_loglikelihoods(model, tokenizer, items, batch_size=batch_size, max_length=max_length, bar=bar)
    acc = acc_norm = 0
    for item, ll in zip(items, lls):
        acc += _argmax(ll) == item["label"]
        acc_norm += _argmax([v / len(c) if c else v for v, c in zip(ll, item["choices"])]) == item["label"]
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def _argmax(values) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no English articles, single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def last_number(text: str) -> Decimal | None:
    """The last number in ``text`` (thousands commas removed), as MGSM scoring takes the answer."""
    for match in reversed(NUMBER.findall(text)):
        try:
            return Decimal(match.replace(",", ""))
        except InvalidOperation:
            continue
    return None


def exact_match(completion: str, answer: str) -> bool:
    """The completion's first non-empty line equals the answer after normalisation."""
    return normalize_answer(first_line(completion)) == normalize_answer(answer)


def numeric_match(completion: str, answer: str) -> bool:
    """The last number in the completion equals the answer's (last) number."""
    want, got = last_number(answer), last_number(completion)
    return want is not None and got is not None and want == got


def format_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SurgeryError("--chat: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def greedy_completions(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 8,
                       chat: bool = False, bar=None) -> list[str]:
    """Greedy decoding of every prompt, left-padded in batches; stops at EOS or ``max_new_tokens``."""
    import torch

    encoded = [format_prompt(tokenizer, p, chat) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = [""] * len(prompts)
    for a in range(0, len(order), batch_size):
        rows = order[a:a + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        for r, i in enumerate(rows):
            out[i] = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
        if bar is not None:
            bar.update(len(rows))
    return out


def generation(model, tokenizer, items: list[dict], *, max_new_tokens: int = 64, batch_size: int = 8,
               chat: bool = False, bar=None) -> dict[str, float]:
    """Greedy completions scored by exact match (first line) and numeric match (last number)."""
    if bar is not None:
        bar.reset(total=len(items))
    completions = greedy_completions(model, tokenizer, [it["prompt"] for it in items], max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, chat=chat, bar=bar)
    n = len(items)
    return {"exact_match": sum(exact_match(c, it["answer"]) for c, it in zip(completions, items)) / n,
            "numeric_match": sum(numeric_match(c, it["answer"]) for c, it in zip(completions, items)) / n}
