"""Plan for diffusers' ``HiDreamImageTransformer2DModel`` (double- and single-stream blocks over image, T5 and Llama
tokens, a new Llama layer's tokens per block, mixture-of-experts feed-forwards)."""

from lightning_dit_parallel.plan import Concat, DiTPlan, Split

#: The joint attention of every block runs over cat([image, t5, llama (the last Llama layer, carried through the
#: blocks), llama (this block's Llama layer)]); both Llama parts are cut like the Llama tokens.
JOINT = ("image", "t5", "llama", "llama")

PLAN = DiTPlan(
    # Text is cut where it enters: T5 (B, T5, C) and the stacked Llama layers (layers, B, L, C), along tokens. The
    # forward projects each and concatenates them per block from these shards, so every text stream it builds (and
    # the lengths it slices them with) is this rank's [t5, llama, llama] shard.
    split_inputs={
        "encoder_hidden_states_t5": Split("t5", 1),
        "encoder_hidden_states_llama3": Split("llama", 2),
    },
    # x_embedder: patchified latents (B, S, p*p*C) -> (B, S, hidden), made inside the forward (square latents give
    # S = h*w tokens; other shapes are padded to max_seq tokens with a token mask).
    split_outputs={"x_embedder": Split("image", 1)},
    # pe_embedder(ids): ids = cat([img_ids (B, S, 3) whole, text ids (B, T5/N + 2L/N, 3) of the local text]); the image
    # part is cut, so that rope covers exactly this rank's [image, t5, llama, llama] shards.
    split_module_inputs={"pe_embedder": {"ids": Concat(("image", None), 1)}},
    # The token mask of non-square latents, (B, S) whole, scales the image keys in every attention; the single-stream
    # blocks get cat([mask, ones of the local text]). Each call gets the mask of this rank's image tokens.
    split_module_inputs_each_call={
        "double_stream_blocks.*.block.attn1": {"hidden_states_masks": Concat(("image", None), 1)},
        "single_stream_blocks.*.block.attn1": {"hidden_states_masks": Concat(("image", None), 1)},
    },
    # final_layer: (B, S/N, p*p*C) -> (B, S, p*p*C) before unpatchify. The text streams are dropped.
    gather_outputs={"final_layer": Split("image", 1)},
    blocks=("double_stream_blocks", "single_stream_blocks"),
    pipeline_unsupported="its double-stream blocks read their Llama layer by a counter of the loop"
    " (encoder_hidden_states[block_id]) and the single-stream part reads the last double block's, values a pipeline"
    " stage would count from its own first block or never set.",
    # HiDreamAttnProcessor concatenates image first: cat([query_i, query_t], dim=1), query_t from cat([t5, llama,
    # llama]); single-stream blocks attend over the forward's cat([image, t5, llama, llama]).
    self_attention={
        "double_stream_blocks.*.block.attn1": JOINT,
        "single_stream_blocks.*.block.attn1": JOINT,
    },
)

PLANS = {"HiDreamImageTransformer2DModel": PLAN}
