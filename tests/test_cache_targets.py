"""Each family's cache target against the model itself, and TeaCache on a plain diffusers pipeline.

A gate is TeaCache's whole view of a step, so a wrong one (the raw hidden states, another block's modulation)
silently caches the wrong steps while every image still looks plausible. Each test runs a real forward, captures
with hooks what the model itself computes (the modulated input the first block hands to its attention, or the
parts BAGEL adds into its generation tokens) and requires the registered gate to equal it.
"""

import numpy as np
import pytest
import torch
from conftest import pixels
from PIL import Image

from teaserve import TeaCacheConfig, apply_teacache, remove_teacache
from teaserve.cache import cache_target_for
from teaserve.pipelines.testing import tiny_flux_pipeline, tiny_qwen_pipeline


class FirstCall:
    """Keyword arguments (blocks and attention are called with keywords) and output of a module's first call."""

    def __init__(self, module: torch.nn.Module, *, output: bool = False):
        self.kwargs: dict | None = None
        self.output = None
        self.handles = [module.register_forward_pre_hook(self._before, with_kwargs=True)]
        if output:
            self.handles.append(module.register_forward_hook(self._after))

    def _before(self, module, args, kwargs):
        if self.kwargs is None:
            self.kwargs = dict(kwargs) if not args else None

    def _after(self, module, args, output):
        if self.output is None:
            self.output = output

    def remove(self):
        for handle in self.handles:
            handle.remove()


def registered_gate(transformer, block_call: FirstCall) -> torch.Tensor:
    target = cache_target_for(transformer)
    first = target.block_stack(transformer)[0]
    return target.gate(first, block_call.kwargs)


@torch.no_grad()
def test_qwen_image_gate_is_the_modulated_input_of_the_first_attention():
    pipe = tiny_qwen_pipeline()
    pipe.set_progress_bar_config(disable=True)
    block = pipe.transformer.transformer_blocks[0]
    block_call, attention_call = FirstCall(block), FirstCall(block.attn)
    pipe("a cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0))
    modulated = attention_call.kwargs["hidden_states"]
    assert not torch.equal(modulated, block_call.kwargs["hidden_states"])
    assert torch.equal(registered_gate(pipe.transformer, block_call), modulated)


@torch.no_grad()
def test_qwen_image_gate_modulates_each_token_by_its_image_when_conditions_are_zero_timestep():
    # Edit-2511 (zero_cond_t): condition-image tokens are modulated at t = 0, the generated ones at t.
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4), zero_cond_t=True,
    ).eval()  # fmt: skip
    block = transformer.transformer_blocks[0]
    block_call, attention_call = FirstCall(block), FirstCall(block.attn)
    transformer(
        hidden_states=torch.randn(1, 32, 16),
        encoder_hidden_states=torch.randn(1, 5, 16),
        encoder_hidden_states_mask=torch.ones(1, 5),
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 4, 4), (1, 4, 4)]],
    )
    assert block_call.kwargs["modulate_index"] is not None
    assert torch.equal(registered_gate(transformer, block_call), attention_call.kwargs["hidden_states"])


@torch.no_grad()
def test_qwen_image_shortcut_is_the_forward_around_the_block_stack():
    """`enter` gives what the first block gets, `leave` of the last block's output gives the forward's output."""
    pipe = tiny_qwen_pipeline()
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    blocks = transformer.transformer_blocks
    first, last, call = FirstCall(blocks[0]), FirstCall(blocks[-1], output=True), FirstCall(transformer, output=True)
    pipe("a cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0))
    shortcut = cache_target_for(transformer).shortcut
    hidden, temb = shortcut.enter(transformer, call.kwargs)
    assert torch.equal(hidden, first.kwargs["hidden_states"]) and torch.equal(temb, first.kwargs["temb"])
    left = shortcut.leave(transformer, last.output[1], temb, call.kwargs)
    assert torch.equal(left[0], call.output[0])  # the pipeline calls with return_dict=False
    transformer.zero_cond_t = True  # per-token modulation: the shortcut leaves the call to the whole forward
    assert shortcut.enter(transformer, call.kwargs) is None


@torch.no_grad()
@pytest.mark.parametrize("kind", ["t2i", "kontext"])
def test_flux_gate_is_the_modulated_input_of_the_first_double_stream_attention(kind):
    pipe = tiny_flux_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    block = transformer.transformer_blocks[0]
    block_call, attention_call = FirstCall(block), FirstCall(block.attn)
    inputs = {}
    if kind == "kontext":  # the condition image as it is: resizing it to Kontext's 1024x1024 takes long on a CPU
        inputs = {"image": Image.new("RGB", (32, 32), (200, 40, 40)), "max_area": 32 * 32, "_auto_resize": False}
    pipe(
        prompt="a cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0), **inputs
    )
    modulated = attention_call.kwargs["hidden_states"]
    assert not torch.equal(modulated, block_call.kwargs["hidden_states"])
    assert torch.equal(registered_gate(transformer, block_call), modulated)
    stack = cache_target_for(transformer).block_stack(transformer)
    assert stack == [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


@torch.no_grad()
def test_bagel_gate_is_the_timestep_dependent_generation_block(tmp_path):
    # BAGEL adds the flow time's embedding to the latent tokens: the gate must be the block that carries it,
    # latents + time + position between the two image markers, as it enters the first MoT layer.
    from teaserve.pipelines import load_model
    from teaserve.pipelines.bagel.pipeline import SamplingSettings
    from teaserve.pipelines.bagel.testing import build_tiny_bagel

    pipe = load_model(str(build_tiny_bagel(tmp_path / "bagel")), dtype="float32").pipeline
    model = pipe.transformer
    block_call = FirstCall(model.language_model.model.layers[0])
    parts = [FirstCall(module, output=True) for module in (model.vae2llm, model.time_embedder, model.latent_pos_embed)]
    text_only = SamplingSettings(cfg_text_scale=1.0)
    pipe("a cat", num_inference_steps=2, width=32, height=32, sampling=text_only, generator=torch.Generator())
    latents, time, position = (part.output for part in parts)
    gate = registered_gate(model, block_call)
    assert torch.equal(gate[:, 1:-1], latents + time + position)
    assert torch.equal(gate[:, [0, -1]], model.language_model.model.embed_tokens(pipe.image_markers)[None])


# -- TeaCache on a pipeline built by diffusers alone -------------------------------------------------------------
def test_apply_teacache_on_a_plain_diffusers_pipeline():
    pipe = tiny_qwen_pipeline()
    pipe.set_progress_bar_config(disable=True)
    inputs = {"prompt": "a cat", "negative_prompt": " ", "true_cfg_scale": 4.0, "height": 32, "width": 32}

    def generate():
        return pipe(**inputs, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]

    uncached = generate()
    teacache = apply_teacache(pipe.transformer, TeaCacheConfig(rel_l1_thresh=1e-9), num_inference_steps=4)
    assert np.array_equal(pixels(generate()), pixels(uncached))
    assert teacache.stats()["skipped_steps"] == 0 and set(teacache.stats()["branches"]) == {"cond", "uncond"}
    teacache.configure(TeaCacheConfig(rel_l1_thresh=1e9))
    cached = generate()
    assert {name: b["schedule"] for name, b in teacache.stats()["branches"].items()} == {
        "cond": "CSSC",
        "uncond": "CSSC",
    }
    assert not np.array_equal(pixels(cached), pixels(uncached))
    remove_teacache(pipe.transformer)
    assert np.array_equal(pixels(generate()), pixels(uncached))
