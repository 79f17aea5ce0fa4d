"""Graph optimisation with onnxruntime's transformer optimizer, per execution target.

For the CPU, EmbedLayerNormalization fusion breaks quantisation, and the fused Attention op packs
Q, K and V weights where the int8 pass cannot reach them, so for int8 attention is fused as
MultiHeadAttention with the projections left as MatMuls. For CUDA the graph is fused fully
(packed-QKV Attention, SkipLayerNormalization, BiasGelu), the form onnxruntime's CUDA kernels and
its fp16 conversion are written for.

On CPU the residual Add and LayerNormalization stay two standard ops: onnxruntime's CPU
SkipLayerNormalization (1.32) computes each row's mean and variance in a scalar loop that divides
per element, 52 us for 25 rows of 384 on one thread against 12.9 us for Add, Add and
LayerNormalization (measured on an Intel Xeon, 2026-12-05); it was a fifth of an int8 MiniLM's run
in `perf`. kiln.runtime.session keeps onnxruntime from fusing them back at load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

# config keys holding the number of attention heads and the hidden size, where they are not the usual ones
_SHAPES = {"distilbert": ("n_heads", "dim")}
_DEFAULT_SHAPE = ("num_attention_heads", "hidden_size")


def optimize_graph(
    model_path: Path, out_path: Path, config: dict[str, Any], for_int8: bool, target: str = "cpu"
) -> dict[str, int]:
    """Write the fused graph to out_path and return how many of each fused op it has."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    heads_key, hidden_key = _SHAPES.get(config.get("model_type", ""), _DEFAULT_SHAPE)
    options = FusionOptions("bert")
    options.enable_embed_layer_norm = False
    options.enable_skip_layer_norm = target != "cpu"  # on CPU, Add + LayerNormalization is 4x faster (below)
    options.use_multi_head_attention = for_int8 and target == "cpu"
    optimized = optimize_model(
        str(model_path),
        model_type="bert",
        num_heads=int(config.get(heads_key, 0)),
        hidden_size=int(config.get(hidden_key, 0)),
        optimization_options=options,
        opt_level=0,  # only the python fusions; onnxruntime applies its own at load time
        use_gpu=target == "cuda",
    )
    optimized.save_model_to_file(str(out_path))
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
