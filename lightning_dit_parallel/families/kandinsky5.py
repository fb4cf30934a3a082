"""Plan for diffusers' ``Kandinsky5Transformer3DModel`` (text blocks over the text, then video blocks with
self-attention under 3-D rotary and cross-attention to the text)."""

from lightning_dit_parallel.plan import DiTPlan, Split

PLAN = DiTPlan(
    # The visual embedding (B, F, H, W, hidden) and its rotary (B, F, H, W, 1, D/2, 2, 2) are flattened inside the
    # forward to (B, F*H*W, hidden) and (B, F*H*W, 1, D/2, 2, 2) and passed to every video block: the tokens are cut
    # where the first video block receives them, the rotary (the same whole tensor for every block) at every block,
    # so every rank rotates its own queries and keys.
    split_module_inputs={"visual_transformer_blocks.0": {"visual_embed": Split("video", 1)}},
    split_module_inputs_each_call={"visual_transformer_blocks.*": {"rope": Split("video", 1)}},
    # The forward unflattens the tokens to (B, F, H, W, hidden) right after the last video block:
    # (B, F*H*W/N, hidden) -> (B, F*H*W, hidden) there.
    gather_outputs={"visual_transformer_blocks.-1": Split("video", 1)},
    # The text blocks refine the text that every video block receives, like a token refiner: they run on every rank
    # and every pipeline stage (not listed as blocks) and attend over the whole text with the local kernel.
    blocks=("visual_transformer_blocks",),
    # Sparse (nabla) attention, ``sparse_params``, attends under a flex-attention block mask estimated from the
    # whole sequence instead of a key mask: not covered.
    self_attention={"visual_transformer_blocks.*.self_attention": ("video",)},
    # cross_attention attends from the cut video queries to the replicated text.
    cross_attention=("visual_transformer_blocks.*.cross_attention",),
    # Kandinsky5's own attention, feed-forward and modulation modules (not diffusers' Attention / FeedForward): heads
    # of both attentions and the MLP features split; the per-sample modulation (B, k * hidden) split and gathered.
    tensor_parallel={
        "visual_transformer_blocks.*.self_attention.to_query": "colwise",
        "visual_transformer_blocks.*.self_attention.to_key": "colwise",
        "visual_transformer_blocks.*.self_attention.to_value": "colwise",
        "visual_transformer_blocks.*.self_attention.out_layer": "rowwise",
        "visual_transformer_blocks.*.cross_attention.to_query": "colwise",
        "visual_transformer_blocks.*.cross_attention.to_key": "colwise",
        "visual_transformer_blocks.*.cross_attention.to_value": "colwise",
        "visual_transformer_blocks.*.cross_attention.out_layer": "rowwise",
        "visual_transformer_blocks.*.feed_forward.in_layer": "colwise",
        "visual_transformer_blocks.*.feed_forward.out_layer": "rowwise",
        "visual_transformer_blocks.*.visual_modulation.out_layer": "colwise_gather",
    },
)

PLANS = {"Kandinsky5Transformer3DModel": PLAN}
