"""The mergekit configs test_mergekit_parity.py runs through mergekit-yaml and `surgery run`: one or more per merge
method mergekit registers (COVERED), and the random methods, compared statistically."""

# {base}, {a}, {b}, {c}: tiny llama checkpoints in bf16; a, b, c are fine-tunes of base.
CONFIGS = {
    "linear": """
        models:
          - model: {a}
            parameters: {{weight: 0.3}}
          - model: {b}
            parameters: {{weight: 0.7}}
        merge_method: linear
    """,
    "linear_gradient_f32": """
        models:
          - model: {a}
            parameters: {{weight: [0.1, 0.9, 0.3]}}
          - model: {b}
            parameters: {{weight: 0.5}}
          - model: {c}
            parameters: {{weight: [1.0, 0.0]}}
        merge_method: linear
        parameters: {{normalize: false}}
        dtype: float32
    """,
    "slerp_filters": """
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 8]
              - model: {b}
                layer_range: [0, 8]
        merge_method: slerp
        base_model: {a}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: bfloat16
    """,
    "nuslerp": """
        models:
          - model: {a}
            parameters: {{weight: 0.4}}
          - model: {b}
            parameters: {{weight: 0.6}}
        merge_method: nuslerp
    """,
    "nuslerp_base": """
        models:
          - model: {a}
            parameters: {{weight: 0.4}}
          - model: {b}
            parameters: {{weight: 0.6}}
        merge_method: nuslerp
        base_model: {base}
        parameters: {{nuslerp_row_wise: true}}
    """,
    "multislerp": """
        models:
          - model: {a}
            parameters: {{weight: 1.0}}
          - model: {b}
            parameters: {{weight: 2.0}}
          - model: {c}
            parameters: {{weight: 0.5}}
        merge_method: multislerp
    """,
    "task_arithmetic": """
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: [0.2, 0.8]}}
        merge_method: task_arithmetic
        base_model: {base}
        parameters: {{lambda: 0.9}}
    """,
    "ties_3_models": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.3}}
          - model: {b}
            parameters: {{weight: 0.3, density: 0.5}}
          - model: {c}
            parameters: {{weight: [0.2, 0.6], density: 0.7}}
          - model: {base}
        merge_method: ties
        base_model: {base}
        parameters: {{normalize: true}}
    """,
    "ties_f32_out_bf16": """
        models:
          - model: {a}
            parameters: {{weight: 1.0, density: 0.5}}
          - model: {b}
            parameters: {{weight: 1.0, density: 0.5}}
        merge_method: ties
        base_model: {base}
        dtype: float32
        out_dtype: bfloat16
    """,
    "ties_filters": """
        models:
          - model: {a}
            parameters:
              weight: 0.6
              density:
                - filter: mlp
                  value: 0.2
                - value: 0.8
          - model: {b}
            parameters: {{weight: 0.4}}
        merge_method: ties
        base_model: {base}
        parameters:
          density: [0.3, 0.9]
          int8_mask: true
    """,
    "dare_ties_density1": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 1.0}}
          - model: {b}
            parameters: {{weight: 0.5, density: 1.0}}
        merge_method: dare_ties
        base_model: {base}
    """,
    "dare_linear_density1": """
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: 0.7}}
        merge_method: dare_linear
        base_model: {base}
    """,
    "della_density1": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 1.0}}
          - model: {b}
            parameters: {{weight: 0.5, density: 1.0}}
        merge_method: della
        base_model: {base}
    """,
    "della_linear_density1": """
        models:
          - model: {a}
            parameters: {{weight: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5}}
        merge_method: della_linear
        base_model: {base}
    """,
    "breadcrumbs": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.7}}
        merge_method: breadcrumbs
        base_model: {base}
    """,
    "breadcrumbs_ties": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.7}}
        merge_method: breadcrumbs_ties
        base_model: {base}
    """,
    "model_stock": """
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        merge_method: model_stock
        base_model: {base}
    """,
    "karcher": """
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        merge_method: karcher
        parameters: {{max_iter: 5}}
    """,
    "arcee_fusion": """
        models:
          - model: {a}
        merge_method: arcee_fusion
        base_model: {base}
    """,
    "nearswap": """
        models:
          - model: {a}
        merge_method: nearswap
        base_model: {base}
        parameters: {{t: 0.02}}
    """,
    "sce": """
        models:
          - model: {a}
          - model: {b}
          - model: {c}
        merge_method: sce
        base_model: {base}
        parameters: {{select_topk: 0.5}}
    """,
    "ram": """
        models:
          - model: {a}
          - model: {b}
        merge_method: ram
        base_model: {base}
    """,
    "ramplus_tl": """
        models:
          - model: {a}
          - model: {b}
        merge_method: ramplus_tl
        base_model: {base}
        parameters: {{r: 0.2, alpha: 0.3}}
    """,
    "passthrough_frankenmerge": """
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 6]
          - sources:
              - model: {b}
                layer_range: [2, 8]
                parameters: {{scale: 0.5}}
          - sources:
              - model: {c}
                layer_range: [7, 8]
        merge_method: passthrough
        dtype: float16
    """,
    "ties_slices": """
        slices:
          - sources:
              - model: {a}
                layer_range: [0, 4]
                parameters: {{weight: 0.5, density: 0.5}}
              - model: {b}
                layer_range: [4, 8]
                parameters: {{weight: [0.2, 0.8], density: 0.7}}
              - model: {base}
                layer_range: [0, 4]
          - sources:
              - model: {b}
                layer_range: [2, 8]
              - model: {base}
                layer_range: [2, 8]
            parameters:
              weight: 0.3
              density:
                - filter: self_attn
                  value: 0.4
        merge_method: ties
        base_model: {base}
        parameters: {{density: 0.6, weight: 1.0}}
    """,
}

# random methods: compared statistically (mergekit draws from one global RNG in its own order)
RANDOM_CONFIGS = {
    "dare_linear": """
        models:
          - model: {a}
            parameters: {{weight: 1.0, density: 0.3}}
        merge_method: dare_linear
        base_model: {base}
        dtype: float32
    """,
    "della_linear": """
        models:
          - model: {a}
            parameters: {{weight: 1.0, density: 0.4, epsilon: 0.1}}
        merge_method: della_linear
        base_model: {base}
        dtype: float32
    """,
    "dare_ties": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.5}}
        merge_method: dare_ties
        base_model: {base}
        dtype: float32
    """,
    "della": """
        models:
          - model: {a}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {b}
            parameters: {{weight: 0.5, density: 0.6}}
        merge_method: della
        base_model: {base}
        dtype: float32
    """,
}

# every merge method mergekit registers must have a parity config in CONFIGS
COVERED = {"linear", "slerp", "nuslerp", "multislerp", "task_arithmetic", "ties", "dare_ties", "dare_linear",
           "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "karcher",
           "arcee_fusion", "nearswap", "sce", "ram", "ramplus_tl", "passthrough"}
