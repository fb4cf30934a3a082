"""Plan for diffusers' ``EasyAnimateTransformer3DModel`` (joint attention over text and video tokens, 3-D rotary)."""

from lightning_dit_parallel.plan import DiTPlan, Split

PLAN = DiTPlan(
    # rope_embedding returns (freqs_cos, freqs_sin), each (F*H*W, D), for the video tokens only: cut along tokens
    # like the video tokens they rotate.
    split_outputs={"rope_embedding": (Split("video", 0), Split("video", 0))},
    # The patch embedding is flattened to (B, F*H*W, hidden) inside the forward, and the text stream (B, T, hidden)
    # is cat([text_proj(text), text_proj_t5(text_t5)]) there too: both are cut where the first block receives them.
    split_module_inputs={
        "transformer_blocks.0": {"hidden_states": Split("video", 1), "encoder_hidden_states": Split("text", 1)},
    },
    # proj_out: (B, F*H*W/N, p*p*C) -> (B, F*H*W, p*p*C) before unpatchify. The text stream is dropped.
    gather_outputs={"proj_out": Split("video", 1)},
    blocks=("transformer_blocks",),
    # EasyAnimateAttnProcessor2_0 attends over cat([text, video], dim=2), in MMDiT blocks (separate text
    # projections) and in the blocks after ``mmdit_layers`` (one projection over cat([text, video], dim=1)) alike;
    # rotary is applied to the video part, query[:, :, T:].
    self_attention={"transformer_blocks.*.attn1": ("text", "video")},
    # The blocks after mmdit_layers (their attention has no text projections add_*_proj) attend with one projection
    # over cat([text, video]) and return the text part of the attention output without an output projection (no
    # to_add_out); the block adds it to the text stream. Models whose blocks are all MMDiT blocks are split.
    tensor_parallel_unsupported={
        "transformer_blocks.*.attn1!add_k_proj": "its blocks after mmdit_layers return the text part of the"
        " attention output without an output projection and add it to the text stream, so the heads that tensor"
        " parallelism splits would have no projection to gather them (a model whose blocks are all MMDiT blocks,"
        " mmdit_layers >= num_layers, is split).",
    },
)

PLANS = {"EasyAnimateTransformer3DModel": PLAN}
