"""surgery probe on the real SmolLM2-135M and real gettext text: probing by layer, and LAPE's central check
(zeroing one language's neurons with reset_neurons raises that language's perplexity more than the others')."""

import pytest

import surgery
from surgery.probing.mo_data import catalog_files, write_mo_data

pytestmark = pytest.mark.slow
LANGS = ["en", "de", "fr", "es"]
N, HELD, MAX_TOKENS = 40, 16, 20


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if any(not catalog_files(lang) for lang in LANGS[1:]):
        pytest.skip("needs the system's gettext catalogs for de, fr and es")
    from surgery.io.gguf import smollm2_checkpoint

    try:
        model = smollm2_checkpoint()
    except surgery.SurgeryError as e:
        pytest.skip(f"SmolLM2 is not available: {e}")
    root = tmp_path_factory.mktemp("real")
    write_mo_data(LANGS[1:], root, limit=3000)
    texts, held = {}, {}
    for lang in LANGS:
        lines = (root / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
        step = len(lines) // (2 * N)     # spread over the catalogs, train and held-out texts interleaved
        texts[lang], held[lang] = lines[::step][:N], lines[step // 2::step][:HELD]
    r = surgery.probe(model, texts, parallel=[root / "en-de.jsonl"], limit=N, max_tokens=MAX_TOKENS, folds=4,
                      progress=False)
    return {"model": model, "root": root, "held": held, "result": r, "m": next(iter(r.models.values()))}


def test_probing_and_alignment_by_layer(real):
    m = real["m"]
    print("\n" + real["result"].format_table())
    assert len(m.layers) == 30 and m.probing.labels == sorted(LANGS) and m.probing.chance == 0.25
    # language identity is linearly decodable from every layer of a real model
    assert min(m.probing.accuracy) > 0.8
    al = m.alignment["en-de"]
    assert all(a.pair_cosine > a.random_cosine for a in al)      # translations are closer than random pairs
    assert max(a.retrieval for a in al) > 4 / N                    # well above chance (1/N)


def test_zeroing_a_languages_neurons_raises_its_perplexity_most(real, tmp_path):
    """The recipe runs in memory through `surgery.evaluate` (the project's perplexity), nothing is written."""
    from surgery.analysis.neuron_set import save_neuron_set

    target = "de"
    neurons = real["result"].neurons(target)
    assert len(neurons) > 20
    save_neuron_set(tmp_path / "de.json", neurons)
    (tmp_path / "mask.yaml").write_text(f"inputs:\n  base: {real['model']}\noperations:\n"
                                        "  - reset_neurons: {to: zero, neurons: {file: de.json}}\n")
    data = {}
    for lang in LANGS:
        data[lang] = tmp_path / f"held-{lang}.txt"
        data[lang].write_text("".join(t + "\n" for t in real["held"][lang]), encoding="utf-8")
    report = surgery.evaluate([real["model"], tmp_path / "mask.yaml"], data, device="cpu", dtype="float32",
                              max_length=MAX_TOKENS)
    base, masked = (row.scores for row in report.rows)
    rise = {lang: masked[lang]["perplexity"] / base[lang]["perplexity"] - 1 for lang in LANGS}
    print(f"\nperplexity on held-out text, base -> {target} neurons zeroed ({len(neurons)} neurons): " + ", ".join(
        f"{lang} {base[lang]['perplexity']:.0f} -> {masked[lang]['perplexity']:.0f} ({rise[lang]:+.0%})"
        for lang in LANGS))
    assert all(rise[target] > rise[lang] for lang in LANGS if lang != target), rise
