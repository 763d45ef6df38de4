"""surgery's own merge methods in `surgery search`: their parameters are searchable like any merge parameter."""

from __future__ import annotations

import pytest

import surgery


@pytest.mark.slow
def test_a_grid_over_lines_beta_runs_every_value(demo_dir, tmp_path):
    ck = demo_dir / "checkpoints"
    (tmp_path / "doc.txt").write_text("the sum of two and two is four\n")
    path = tmp_path / "s.yaml"
    path.write_text(f"""\
recipe:
  inputs: {{base: {ck / 'base'}, math: {ck / 'math'}, sw: {ck / 'swahili'}}}
  recipient: base
  operations:
    - merge:
        method: lines
        base: base
        models: {{math: {{weight: 1.0}}, sw: {{weight: 1.0}}}}
        parameters: {{alpha: 0.0, beta: {{float: [0, 1], step: 0.5}}}}
objective:
  - {{data: {tmp_path / 'doc.txt'}, metric: perplexity, weight: -1}}
trials: 3
sampler: grid
eval: {{dtype: float32}}
""")
    spec = surgery.load_search(path)
    assert spec.param_names() == ["operations.0.merge.parameters.beta"]
    result = surgery.search(path, tmp_path / "out")
    rows = [r for r in result.trials if r["state"] == "complete"]
    assert sorted(r["operations.0.merge.parameters.beta"] for r in rows) == [0.0, 0.5, 1.0]
    values = {r["operations.0.merge.parameters.beta"]: r["value"] for r in rows}
    assert values[0.0] != values[1.0]  # beta changes the merged model (alpha = beta = 0 is the base)
