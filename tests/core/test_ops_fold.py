"""ops.evaluate folds linear nodes one argument at a time; the bytes must equal the all-at-once compute."""

import torch

from surgery.core.graph import OPS, Node, Ref, evaluate


def test_linear_fold_equals_compute_bytewise():
    gen = torch.Generator().manual_seed(0)
    store = {n: torch.randn(64, 48, generator=gen).to(torch.bfloat16) for n in "abc"}
    node = Node("linear", [Ref(n, "w") for n in "abc"], {"coeffs": [0.2, 0.5, -0.3]})
    folded = evaluate(node, lambda r: store[r.input])
    direct = OPS["linear"].compute([store[n].float() for n in "abc"], node.params)
    assert folded.dtype == torch.float32
    assert torch.equal(folded.view(torch.int32), direct.view(torch.int32))


def test_fold_does_not_modify_inputs_and_nests():
    gen = torch.Generator().manual_seed(1)
    store = {n: torch.randn(8, 8, generator=gen) for n in "ab"}  # float32: .float() returns the same tensor
    before = {n: t.clone() for n, t in store.items()}
    inner = Node("linear", [Ref("a", "w"), Ref("b", "w")], {"coeffs": [1.0, -1.0]})
    node = Node("linear", [Ref("a", "w"), inner], {"coeffs": [1.0, 0.5]})
    out = evaluate(node, lambda r: store[r.input])
    assert torch.allclose(out, 1.5 * store["a"] - 0.5 * store["b"], atol=1e-6)
    for n in "ab":
        assert torch.equal(store[n], before[n])
