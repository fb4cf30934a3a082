"""Plan for diffusers' ``Lumina2Transformer2DModel`` (Lumina Image 2.0: refiner blocks over the image and the text
streams, then self-attention over one joint sequence per sample with a padding mask)."""

from lightning_dit_parallel.plan import DiTPlan, Split

PLAN = DiTPlan(
    # rope_embedder returns (patchified image tokens (B, S, p*p*C), text freqs (B, T, D), image freqs (B, S, D),
    # joint freqs (B, L, D), text lengths, joint lengths), L = max over samples of (valid text + S). The image
    # tokens and their freqs are cut for the noise refiner, the joint freqs for the joint blocks.
    split_outputs={"rope_embedder": (Split("image", 1), None, Split("image", 1), Split("joint", 1), None, None)},
    # The context refiner runs on the whole text (B, T, hidden) with its mask on every rank (it is short); the noise
    # refiner's output (B, S/N, hidden) is gathered after its last block, because the forward then writes each
    # sample's [valid text, image] into one joint sequence (B, L, hidden), which is cut where the first joint block
    # receives it. norm_out: (B, L/N, p*p*C) -> (B, L, p*p*C) before the per-sample unpatchify.
    gather_outputs={"noise_refiner.-1": Split("image", 1), "norm_out": Split("joint", 1)},
    split_module_inputs={"layers.0": {"hidden_states": Split("joint", 1)}},
    # Every joint block gets the joint padding mask (B, L) (when the samples' text lengths differ).
    split_module_inputs_each_call={"layers.*": {"attention_mask": Split("joint", 1)}},
    blocks=("layers",),
    self_attention={"noise_refiner.*.attn": ("image",), "layers.*.attn": ("joint",)},
)

PLANS = {"Lumina2Transformer2DModel": PLAN}
