"""Built-in evaluators against independent computations on a tiny random llama."""

import math

import pytest
import torch

from eval_fixtures import CHOICES, GENERATION, TEXTS, tiny_lm
from surgery.eval import metrics


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_lm(tmp_path_factory.mktemp("lm") / "lm")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def hand_nll(model, ids: list[int]) -> float:
    """Negative log-likelihood of ids[1:] given the prefix, one document, no batching."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], -1)
    return -float(logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


def test_perplexity_and_bits_per_byte_match_a_hand_loop(lm):
    model, tok = lm
    nll = tokens = 0
    for doc in TEXTS:
        ids = [tok.bos_token_id] + tok(doc, add_special_tokens=False).input_ids
        assert len(ids) - 1 == len(doc.encode("utf-8"))  # the byte tokenizer: one token per byte
        nll += hand_nll(model, ids)
        tokens += len(ids) - 1
    n_bytes = sum(len(d.encode("utf-8")) for d in TEXTS)
    got = metrics.perplexity(model, tok, TEXTS, batch_size=3)
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    assert n_bytes > sum(len(d) for d in TEXTS)  # non-ASCII text: bytes, not characters


def test_sliding_window_matches_transformers_fixed_length_loop(lm):
    """The loop of transformers' docs ("perplexity of fixed-length models"), with its own loss."""
    model, tok = lm
    doc = " ".join(TEXTS)
    ids = torch.tensor([[tok.bos_token_id] + tok(doc, add_special_tokens=False).input_ids])
    max_length, stride, seq_len = 32, 12, ids.shape[1]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        valid = int((target[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == seq_len:
            break
    assert n_tokens == seq_len - 1
    got = metrics.perplexity(model, tok, [doc], max_length=max_length, stride=stride, batch_size=4)
    assert got["perplexity"] == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-5)
    whole = metrics.perplexity(model, tok, [doc], max_length=128)
    assert whole["perplexity"] != pytest.approx(got["perplexity"], rel=1e-6)  # the window changed the context


def test_sliding_windows_score_every_token_once():
    for n, w, s in [(1, 4, 2), (2, 4, 2), (10, 4, 3), (10, 4, 1), (37, 8, 7), (8, 8, 4)]:
        scored = [p for _, end, first in metrics.sliding_windows(n, w, s) for p in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= w and first > begin for begin, end, first in metrics.sliding_windows(n, w, s))


def test_perplexity_equals_lm_eval_rolling_loglikelihood(lm):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = lm
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu")
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(TEXTS)]
    theirs = -sum(hflm.loglikelihood_rolling(requests, disable_tqdm=True))
    tokens = sum(len(tok(d, add_special_tokens=False).input_ids) for d in TEXTS)
    ours = metrics.perplexity(model, tok, TEXTS)
    assert math.log(ours["perplexity"]) * tokens == pytest.approx(theirs, rel=1e-5)


def test_choice_loglikelihoods_and_accuracy_match_hand_computation(lm):
    model, tok = lm
    hand = []
    for item in CHOICES:
        context = tok(item["prompt"]).input_ids
        row = []
        for choice in item["choices"]:
            whole = tok(item["prompt"] + " " + choice).input_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            row.append(sum(float(logprobs[j - 1, whole[j]]) for j in range(len(context), len(whole))))
        hand.append(row)
    got = metrics.choice_loglikelihoods(model, tok, CHOICES, batch_size=4)
    for g, h in zip(got, hand):
        assert g == pytest.approx(h, rel=1e-5)
    acc = sum(max(range(len(h)), key=h.__getitem__) == it["label"] for h, it in zip(hand, CHOICES)) / len(CHOICES)
    norm = sum(max(range(len(h)), key=lambda i: h[i] / len(it["choices"][i])) == it["label"]
               for h, it in zip(hand, CHOICES)) / len(CHOICES)
    assert metrics.multiple_choice(model, tok, CHOICES, batch_size=5) == {"acc": acc, "acc_norm": norm}


@pytest.mark.parametrize("completion, answer, numeric", [
    ("The answer is 42.", "42", True),
    ("We get 1,234 apples", "1234", True),
    ("x = 3.50", "3.5", True),
    ("first 7 then -8", "-8", True),
    ("first 7 then 8", "7", False),   # the last number counts
    ("no number here", "0", False),
    ("42", "The answer is 42", True),
])
def test_numeric_match(completion, answer, numeric):
    assert metrics.numeric_match(completion, answer) is numeric


@pytest.mark.parametrize("completion, answer, exact", [
    (" Paris.\nMore text", "Paris", True),
    ("\n\nThe Paris", "paris", True),
    ("Paris is the capital", "Paris", False),
    ("", "x", False),
])
def test_exact_match(completion, answer, exact):
    assert metrics.exact_match(completion, answer) is exact


def test_generation_is_greedy_and_scored(lm):
    model, tok = lm
    n_new = 6
    hand = []
    for item in GENERATION:
        ids = tok(item["prompt"]).input_ids
        for _ in range(n_new):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
        hand.append(tok.decode(ids[len(tok(item["prompt"]).input_ids):], skip_special_tokens=True))
    got = metrics.greedy_completions(model, tok, [g["prompt"] for g in GENERATION], max_new_tokens=n_new, batch_size=1)
    assert got == hand
    items = [{"prompt": g["prompt"], "answer": c.strip() or "x"} for g, c in zip(GENERATION, hand)]
    items[0]["answer"] = "never this"
    scores = metrics.generation(model, tok, items, max_new_tokens=n_new, batch_size=1)
    want_exact = sum(metrics.exact_match(c, it["answer"]) for c, it in zip(hand, items)) / 3
    assert scores["exact_match"] == want_exact and want_exact >= 1 / 3
