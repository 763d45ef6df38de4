"""Helpers of the search tests: the swap world's word-level tokenizer and layer-swap recipe, search files written
from a template, and trial values keyed by configuration."""

from pathlib import Path

import torch

VOCAB = 512
SWAP = "bottom: {int: [1, 4]}, top: {int: [1, 4]}"


def save_word_tokenizer(folder: Path) -> None:
    """Tokens w000..w511 (one width, so the special tokens match only whole words), split on spaces;
    w000 is BOS (the prefix the evaluator scores after)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i:03d}": i for i in range(VOCAB)}, unk_token="w001"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w000", eos_token="w000",
                            unk_token="w001").save_pretrained(folder)


def swap_recipe(root: Path, bottom: int, top: int) -> dict:
    return {"inputs": {"math": str(root / "math"), "sw": str(root / "swahili")}, "recipient": "math",
            "operations": [{"layer_swap": {"donor": "sw", "bottom": bottom, "top": top}}]}


def nll_by_hand(model_dir: Path, docs: list[list[int]]) -> float:
    """Mean negative log-likelihood per token after the BOS prefix, with transformers directly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[0] + d for d in docs])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
    return float(-logp.gather(2, ids[:, 1:, None]).mean())



def write_search(root: Path, name: str, body: str) -> Path:
    path = root / name
    path.write_text(body)
    return path


def swap_search(root: Path, sampler="grid", trials=16, swap=SWAP, extra="", name=None) -> Path:
    return write_search(root, name or f"search-{sampler}.yaml", f"""\
recipe:
  inputs: {{math: math, sw: swahili}}
  recipient: math
  operations:
    - layer_swap: {{donor: sw, {swap}}}
objective:
  - {{data: gen.txt, metric: perplexity, weight: -1}}
trials: {trials}
sampler: {sampler}
eval: {{dtype: float32}}
{extra}""")


SMALL = "bottom: {int: [1, 3]}, top: {int: [1, 2]}"  # 6 of the 16 configurations


def by_config(rows):
    keys = [k for k in rows[0] if k.startswith("operations.")]
    return {tuple(r[k] for k in keys): r["value"] for r in rows if r["state"] == "complete"}
