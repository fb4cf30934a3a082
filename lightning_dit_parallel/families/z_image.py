"""Plan for diffusers' ``ZImageTransformer2DModel`` (Z-Image: refiner blocks over the image and the caption
streams, then self-attention over one joint sequence per sample; inputs are per-sample lists)."""

from lightning_dit_parallel.plan import DiTPlan, Split

PLAN = DiTPlan(
    # The forward patchifies the per-sample lists, pads every stream to a multiple of 32 tokens (pad tokens take
    # part in attention) and stacks them: image tokens x (B, S, dim) with freqs_cis (B, S, D/2) (complex), a
    # padding mask (B, S) when the samples' lengths differ and, in omni mode, a per-token noise mask (B, S). The
    # image tokens are cut where the first noise-refiner block receives them; the per-token tensors the forward
    # passes to every block are cut at each call.
    split_module_inputs={"noise_refiner.0": {"x": Split("image", 1)}, "layers.0": {"x": Split("joint", 1)}},
    split_module_inputs_each_call={
        "noise_refiner.*": {
            "attn_mask": Split("image", 1),
            "freqs_cis": Split("image", 1),
            "noise_mask": Split("image", 1),
        },
        "layers.*": {"attn_mask": Split("joint", 1), "freqs_cis": Split("joint", 1), "noise_mask": Split("joint", 1)},
        "all_final_layer.*": {"noise_mask": Split("joint", 1)},
    },
    # The caption (and omni SigLIP) refiners run on their whole, short streams on every rank. The noise refiner's
    # output (B, S/N, dim) is gathered after its last block: the forward then builds each sample's [image, caption]
    # (omni: [caption, image, siglip]) joint sequence (B, L, dim), cut where the first joint block receives it.
    # The final layer (one per patch size): (B, L/N, p*p*pf*C) -> (B, L, p*p*pf*C) before the per-sample unpatchify.
    gather_outputs={"noise_refiner.-1": Split("image", 1), "all_final_layer.*": Split("joint", 1)},
    blocks=("layers",),
    # ControlNet residuals: their layout is not described here, so sequence parallelism refuses them.
    sequence_unsupported_inputs={"controlnet_block_samples": "this plan does not cut ControlNet residuals"},
    block_indexed_inputs=("controlnet_block_samples",),
    self_attention={"noise_refiner.*.attention": ("image",), "layers.*.attention": ("joint",)},
)

PLANS = {"ZImageTransformer2DModel": PLAN}
