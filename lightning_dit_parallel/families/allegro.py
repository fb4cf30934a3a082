"""Plan for diffusers' ``AllegroTransformer3DModel`` (video self-attention with 3-D rotary indexed by token
positions, cross-attention to text)."""

from lightning_dit_parallel.plan import DiTPlan, Split

PLAN = DiTPlan(
    # image_rotary_emb = ((freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w)): the frequency tables are indexed
    # by position and stay whole; the positions of the tokens, three (1, F*H*W) tensors, are cut along tokens so
    # every rank rotates its own queries and keys.
    split_inputs={"image_rotary_emb": (None, (Split("video", -1), Split("video", -1), Split("video", -1)))},
    # The patch embedding runs per frame and the forward flattens it to (B, F*H*W, hidden): the tokens are cut
    # where the first block receives them.
    split_module_inputs={"transformer_blocks.0": {"hidden_states": Split("video", 1)}},
    # A video attention_mask (B, F, H, W) becomes an additive (B, 1, F*H*W) key mask in the forward, passed to every
    # block: cut with the keys, (B, 1, S) -> (B, 1, S/N).
    split_module_inputs_each_call={"transformer_blocks.*": {"attention_mask": Split("video", -1)}},
    # proj_out: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("transformer_blocks",),
    self_attention={"transformer_blocks.*.attn1": ("video",)},
    # attn2 attends from the cut video queries to the replicated text (with its additive mask).
    cross_attention=("transformer_blocks.*.attn2",),
)

PLANS = {"AllegroTransformer3DModel": PLAN}
