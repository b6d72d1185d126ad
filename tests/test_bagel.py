"""BAGEL on a tiny random checkpoint in the official layout, and the real 7B configuration on the meta device."""

import re

import httpx
import numpy as np
import pytest
import torch
from conftest import RunningServer, decode_b64_image, pixels, png_bytes
from PIL import Image

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.engine import AsyncEngine
from teaserve.pipelines.bagel.pipeline import BagelFlowSchedule, combine_cfg
from teaserve.pipelines.loading import read_architecture

STEPS = 6


@pytest.fixture(scope="module")
def tiny_bagel(tmp_path_factory):
    from teaserve.pipelines.bagel.testing import build_tiny_bagel

    return build_tiny_bagel(tmp_path_factory.mktemp("tiny-bagel"))


@pytest.fixture(scope="module")
def omni(tiny_bagel):
    with Omni(model=str(tiny_bagel), cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.2}) as omni:
        yield omni


def input_image(width=100, height=70, tint=0):
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, tint)], axis=-1).astype(np.uint8)
    return Image.fromarray(array)


def generate(omni, prompt="a red cat", image=None, cache=None, **params):
    params = {"num_inference_steps": STEPS, "seed": 3, "cache_config": cache or {"enabled": False}, **params}
    request = {"prompt": prompt, "multi_modal_data": {"image": image} if image is not None else {}}
    return omni.generate(request, OmniDiffusionSamplingParams(**params))[0]


def cfg_steps(steps, low=0.4, high=1.0, shift=3.0):
    schedule = BagelFlowSchedule()
    schedule.set_timesteps(steps, shift)
    return sum(low < t <= high for t in schedule.sigmas[:-1].tolist())


# -- loading and the engine contract ---------------------------------------------------------------------------
def test_the_official_layout_is_recognised_without_model_index(tiny_bagel, omni):
    files = {path.name for path in tiny_bagel.iterdir()}
    assert {"llm_config.json", "vit_config.json", "config.json", "ema.safetensors", "ae.safetensors"} <= files
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= files
    assert "model_index.json" not in files
    assert read_architecture(tiny_bagel) == "BagelForConditionalGeneration"
    assert omni.model.architecture == "BagelForConditionalGeneration" and omni.model.size_multiple == 16
    assert omni.model.family.defaults.num_inference_steps == 49 and omni.model.family.defaults.true_cfg_scale == 4.0
    model = omni.model.pipeline.transformer
    assert model.config.vit.num_hidden_layers == 1  # vit_config.json says 2: BAGEL drops the last layer
    assert model.config.max_latent_size == 8 and model.config.vit_max_num_patch_per_side == 16


def test_text_to_image_has_the_asked_size_and_runs_text_cfg_inside_its_interval(omni):
    output = generate(omni, width=48, height=32)
    assert [image.size for image in output.images] == [(48, 32)]
    assert output.metrics.steps == STEPS
    # "cond" at every step, "uncond_text" where 0.4 < t <= 1; no image branch without an input image.
    assert output.metrics.transformer_calls == STEPS + cfg_steps(STEPS) < 2 * STEPS
    no_cfg = generate(omni, width=48, height=32, true_cfg_scale=1.0)
    assert no_cfg.metrics.transformer_calls == STEPS
    assert not np.array_equal(pixels(output.images[0]), pixels(no_cfg.images[0]))


def test_profile_defaults_and_size_limits(omni):
    output = generate(omni)
    assert output.images[0].size == (64, 64)
    with pytest.raises(Exception, match="up to 128 px"):
        generate(omni, width=144, height=32)


def test_edit_outputs_the_resized_input_size_with_three_branches(omni):
    output = generate(omni, "make it blue", image=input_image(100, 70))
    assert output.images[0].size == (96, 64)  # BAGEL's VAE resize: multiples of 16, here within 64..128 px
    assert output.metrics.transformer_calls == 3 * STEPS  # edit CFG interval is (0, 1]: every step
    small = generate(omni, "make it blue", image=input_image(30, 20))
    assert small.images[0].size == (96, 64)  # shortest side scaled up to the minimum
    with pytest.raises(ValueError, match="omit size"):
        generate(omni, "make it blue", image=input_image(), width=48, height=32)


def test_the_edit_depends_on_the_input_image_and_both_cfg_scales(omni):
    first = generate(omni, "make it blue", image=input_image(tint=0))
    other_image = generate(omni, "make it blue", image=input_image(tint=255))
    no_image_cfg = generate(omni, "make it blue", image=input_image(tint=0), guidance_scale=1.0)
    assert no_image_cfg.metrics.transformer_calls == 2 * STEPS
    for other in (other_image, no_image_cfg):
        assert not np.array_equal(pixels(first.images[0]), pixels(other.images[0]))


def test_image_guidance_runs_without_text_guidance(omni):
    # The reference code applies no guidance at all when cfg_text_scale <= 1, whatever cfg_img_scale says (it
    # computes the image-free branch and ignores it); teaserve's two scales are independent.
    image_only = generate(omni, "make it blue", image=input_image(), true_cfg_scale=1.0, guidance_scale=2.0)
    unguided = generate(omni, "make it blue", image=input_image(), true_cfg_scale=1.0, guidance_scale=1.0)
    assert image_only.metrics.transformer_calls == 2 * STEPS and unguided.metrics.transformer_calls == STEPS
    assert not np.array_equal(pixels(image_only.images[0]), pixels(unguided.images[0]))


def test_negative_prompt_fills_the_text_free_branch(omni):
    plain = generate(omni, width=48, height=32)
    negative = generate(omni, width=48, height=32, negative_prompt="blurry")
    assert not np.array_equal(pixels(plain.images[0]), pixels(negative.images[0]))


def test_same_seed_same_pixels_other_seed_differs(omni):
    for image in (None, input_image()):
        first, second = (generate(omni, image=image, seed=7) for _ in range(2))
        other = generate(omni, image=image, seed=8)
        assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
        assert not np.array_equal(pixels(first.images[0]), pixels(other.images[0]))


def test_every_output_of_an_edit_can_be_regenerated_alone_with_its_seed(omni):
    # Each output samples the input image's VAE posterior with its own generator, as a request of its own does.
    both = generate(omni, "make it blue", image=input_image(), seed=4, num_outputs_per_prompt=2)
    alone = generate(omni, "make it blue", image=input_image(), seed=5)
    assert both.seeds == [4, 5]
    assert not np.array_equal(pixels(both.images[0]), pixels(both.images[1]))
    assert np.abs(pixels(both.images[1]) - pixels(alone.images[0])).max() <= 1


def test_edit_contexts_follow_the_reference_positions(omni):
    pipe = omni.model.pipeline
    text = pipe.text_block("make it blue")
    generators = [torch.Generator().manual_seed(0)]
    contexts = pipe.build_contexts("make it blue", input_image(), None, generators)
    # VAE block (6x4 tokens + 2 markers) at position 0, ViT block (7x5 patches + 2) at 1, then the text.
    assert contexts["cond"].next_position == 2 + len(text)
    assert contexts["cond"].length == (24 + 2) + (35 + 2) + len(text)
    assert (contexts["uncond_text"].next_position, contexts["uncond_text"].length) == (2, 63)
    assert (contexts["uncond_image"].next_position, contexts["uncond_image"].length) == (len(text), len(text))
    t2i = pipe.build_contexts("make it blue", None, None, generators)
    assert t2i["uncond_text"].length == 0 and t2i["uncond_image"] is None


# -- TeaCache ----------------------------------------------------------------------------------------------------
def test_never_skipping_tea_cache_is_pixel_identical_to_no_cache(omni):
    for image in (None, input_image()):
        uncached = generate(omni, image=image)
        never_skips = generate(omni, image=image, cache={"rel_l1_thresh": 1e-12})
        assert never_skips.metrics.cache["skipped_steps"] == 0
        assert np.array_equal(pixels(uncached.images[0]), pixels(never_skips.images[0]))


def test_huge_threshold_computes_only_first_and_last_step_of_each_branch(omni):
    output = generate(omni, "make it blue", image=input_image(), cache={"rel_l1_thresh": 1e9})
    branches = output.metrics.cache["branches"]
    assert set(branches) == {"cond", "uncond_text", "uncond_image"}
    for branch in branches.values():
        assert branch["schedule"] == "C" + "S" * (STEPS - 2) + "C"
    assert output.metrics.transformer_calls == 3 * STEPS  # the embedders and heads still run; the layers skip


def test_text_branch_of_text_to_image_stops_at_the_cfg_interval(omni):
    output = generate(omni, cache={"rel_l1_thresh": 1e9})
    branches = output.metrics.cache["branches"]
    assert set(branches) == {"cond", "uncond_text"}
    assert branches["cond"]["schedule"] == "C" + "S" * (STEPS - 2) + "C"
    assert branches["uncond_text"]["schedule"] == "C" + "S" * (cfg_steps(STEPS) - 1)


def test_cfg_branches_keep_their_own_state_and_counts(omni):
    output = generate(omni, "make it blue", image=input_image(), cache={"rel_l1_thresh": 0.4})
    cache = output.metrics.cache
    assert set(cache["branches"]) == {"cond", "uncond_text", "uncond_image"}
    for branch in cache["branches"].values():
        assert branch["computed_steps"] + branch["skipped_steps"] == STEPS
        assert len(branch["rel_l1"]) == STEPS and branch["rel_l1"][0] is None
    assert cache["computed_steps"] == sum(b["computed_steps"] for b in cache["branches"].values())


def test_cfg_is_applied_after_the_cached_forward(omni):
    # vLLM-Omni's BAGEL TeaCache returned the unguided velocity: guidance must still change a cached run.
    cache = {"rel_l1_thresh": 1e9}
    for image, knob in ((None, "true_cfg_scale"), (input_image(), "guidance_scale")):
        guided = generate(omni, "make it blue", image=image, cache=cache)
        unguided = generate(omni, "make it blue", image=image, cache=cache, **{knob: 1.0})
        assert guided.metrics.cache["skipped_steps"] > 0
        assert not np.array_equal(pixels(guided.images[0]), pixels(unguided.images[0]))


# -- sampler pieces ----------------------------------------------------------------------------------------------
def test_reference_schedule_has_49_steps_and_41_of_them_guided():
    schedule = BagelFlowSchedule()
    schedule.set_timesteps(49, 3.0)
    sigmas = schedule.sigmas.double()
    assert len(sigmas) == 50 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert float(sigmas[1]) == pytest.approx(0.9931, abs=1e-4) and float(sigmas[48]) == pytest.approx(0.0588, abs=1e-4)
    assert cfg_steps(49) == 41


def test_sampling_settings_default_per_task_and_refuse_unknown_renorm_types():
    from teaserve.pipelines.bagel.pipeline import SamplingSettings

    def knobs(settings):
        return settings.cfg_text_scale, settings.cfg_img_scale, settings.cfg_interval, settings.cfg_renorm_type

    t2i = SamplingSettings.for_task(editing=False, cfg_img_scale=None)
    edit = SamplingSettings.for_task(editing=True, cfg_text_scale=5.0, cfg_img_scale=None)
    assert knobs(t2i) == (4.0, 1.0, (0.4, 1.0), "global")
    assert knobs(edit) == (5.0, 2.0, (0.0, 1.0), "text_channel")
    assert [edit.guides_at(t) for t in (1.0, 0.5, 0.0)] == [True, True, False]
    assert [t2i.guides_at(t) for t in (1.0, 0.5, 0.4)] == [True, True, False]
    with pytest.raises(ValueError, match="global, channel, text_channel"):
        SamplingSettings(cfg_renorm_type="local")  # type: ignore[arg-type]


def test_cfg_combination_rules():
    torch.manual_seed(0)
    full, text_free, image_free = (torch.randn(2, 6, 64) for _ in range(3))
    kwargs = {"renorm_min": 0.0}
    same = combine_cfg(full, text_free, None, text_scale=1.0, image_scale=1.0, renorm_type="global", **kwargs)
    assert torch.allclose(same, full, atol=1e-6)
    for renorm in ("global", "channel"):
        guided = combine_cfg(full, text_free, image_free, text_scale=4.0, image_scale=2.0, renorm_type=renorm, **kwargs)
        dims = (1, 2) if renorm == "global" else (-1,)
        assert (guided.norm(dim=dims) <= full.norm(dim=dims) * (1 + 1e-5)).all()
    text_channel = combine_cfg(
        full, text_free, image_free, text_scale=4.0, image_scale=2.0, renorm_type="text_channel", **kwargs
    )
    assert (text_channel.norm(dim=-1) > full.norm(dim=-1)).any()  # no renorm after the image guidance
    # "global" is per image: scaling one image's velocities does not change the other's result.
    scaled = full.clone()
    scaled[1] *= 10
    a = combine_cfg(full, text_free, None, text_scale=4.0, image_scale=1.0, renorm_type="global", **kwargs)
    b = combine_cfg(scaled, text_free, None, text_scale=4.0, image_scale=1.0, renorm_type="global", **kwargs)
    assert torch.allclose(a[0], b[0])


def test_cfg_combination_formulas():
    # BAGEL's rules written out: text guidance, then image guidance on top; "global"/"channel" rescale the result
    # to at most the full branch's norm (per image / per token), "text_channel" only the text-guided part.
    torch.manual_seed(1)
    full, text_free, image_free = (torch.randn(2, 6, 64) for _ in range(3))
    text_guided = text_free + 4.0 * (full - text_free)
    both_guided = image_free + 2.0 * (text_guided - image_free)

    def combine(text_free, image_free, renorm_type, renorm_min=0.0, text_scale=4.0, image_scale=2.0):
        return combine_cfg(
            full,
            text_free,
            image_free,
            text_scale=text_scale,
            image_scale=image_scale,
            renorm_type=renorm_type,
            renorm_min=renorm_min,
        )

    def renormed(velocity, dims, renorm_min=0.0):
        factor = full.norm(dim=dims, keepdim=True) / velocity.norm(dim=dims, keepdim=True)
        return velocity * factor.clamp(min=renorm_min, max=1.0)

    expected = {
        "global": renormed(both_guided, (1, 2)),
        "channel": renormed(both_guided, (-1,)),
        "text_channel": image_free + 2.0 * (renormed(text_guided, (-1,)) - image_free),
    }
    for renorm_type, value in expected.items():
        assert torch.allclose(combine(text_free, image_free, renorm_type), value, atol=1e-5)
        # renorm_min 1 pins the factor to 1: the bare guidance formula
        assert torch.allclose(combine(text_free, image_free, renorm_type, renorm_min=1.0), both_guided, atol=1e-5)
        # a guided velocity shorter than the full one stays as it is: renorm only ever shrinks
        shorter = combine(1.1 * full, None, renorm_type, image_scale=1.0)  # 1.1 v + 4 (v - 1.1 v) = 0.7 v
        assert torch.allclose(shorter, 0.7 * full, atol=1e-5)
    bounded = combine(text_free, None, "global", renorm_min=0.9, image_scale=1.0)
    assert torch.allclose(bounded, renormed(text_guided, (1, 2), renorm_min=0.9), atol=1e-5)
    # image guidance alone (no text branch): plain CFG between the full and the image-free branch
    image_only = combine(None, image_free, "text_channel", text_scale=1.0)
    assert torch.allclose(image_only, image_free + 2.0 * (full - image_free), atol=1e-5)


def test_sincos_table_encodes_the_column_first():
    from teaserve.pipelines.bagel.packing import sincos_2d_table

    table = sincos_2d_table(4, 8)  # quarter = 2 frequencies: 1 and 1/100
    row, column = 2, 3
    expected_column = [np.sin(column), np.sin(column / 100), np.cos(column), np.cos(column / 100)]
    expected_row = [np.sin(row), np.sin(row / 100), np.cos(row), np.cos(row / 100)]
    assert torch.allclose(table[row * 4 + column], torch.tensor(expected_column + expected_row, dtype=torch.float32))


def test_patchify_round_trip_and_order():
    from teaserve.pipelines.bagel.packing import patchify, unpatchify

    latents = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    tokens = patchify(latents, 2)
    assert tokens.shape == (2, 6, 64)
    # token 1 = patch (row 0, column 1); its value 0 is pixel (0, 2) of channel 0, value 1 is channel 1
    assert tokens[0, 1, 0] == latents[0, 0, 0, 2] and tokens[0, 1, 1] == latents[0, 1, 0, 2]
    assert torch.equal(unpatchify(tokens, 2, 3, 2), latents)


def test_mot_routes_text_to_the_understanding_expert_and_latents_to_the_generation_expert(omni):
    import copy

    pipe = omni.model.pipeline
    model = copy.deepcopy(pipe.transformer)
    text = pipe.text_block("a red cat")
    latents = torch.randn(1, 6, 64)

    def run(model):
        text_context, image_context = model.new_context(), model.new_context()
        model.prefill_text(text_context, text)
        model.prefill_vae_image(image_context, latents, (2, 3), pipe.image_markers)
        return text_context.keys[-1], image_context.keys[-1]

    text_keys, image_keys = run(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "moe_gen" in name:
                parameter.add_(0.5)
    perturbed_text, perturbed_image = run(model)
    assert torch.equal(text_keys, perturbed_text)
    assert not torch.allclose(image_keys[:, :, 1:-1], perturbed_image[:, :, 1:-1])
    # the markers run the understanding expert, yet see the latents through the shared attention
    assert not torch.allclose(image_keys[:, :, -1], perturbed_image[:, :, -1])


@pytest.mark.parametrize("expert", ["understanding", "generation"])
def test_each_expert_equals_transformers_qk_norm_qwen(expert):
    # Qwen3 is Qwen2 with the per-head q/k RMSNorm BAGEL adds; with q/k/v biases and a zero o_proj bias it is
    # exactly one of BAGEL's experts, so a causal prefill routed to that expert must give the same hidden states.
    # Every norm weight is perturbed on its own, so that an expert that borrowed the other's norms would differ.
    from transformers import Qwen3Config, Qwen3Model

    from teaserve.pipelines.bagel.config import LanguageModelConfig
    from teaserve.pipelines.bagel.llm import KVContext, MoTQwen2Model

    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 100}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    torch.manual_seed(0)
    ours = MoTQwen2Model(LanguageModelConfig(**sizes, **heads)).eval()
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    reference = Qwen3Model(
        Qwen3Config(**sizes, **heads, head_dim=16, attention_bias=True, rope_theta=1e6, rms_norm_eps=1e-6)
    ).eval()
    weights = ours.state_dict()
    state = {name: tensor for name, tensor in weights.items() if "moe_gen" not in name}  # understanding + shared
    if expert == "generation":
        state.update({name.replace("_moe_gen", ""): tensor for name, tensor in weights.items() if "moe_gen" in name})
    state.update({f"layers.{i}.self_attn.o_proj.bias": torch.zeros(64) for i in range(2)})
    reference.load_state_dict(state, strict=True)
    ids = torch.tensor([[5, 17, 3, 44, 9, 2, 71]])
    gen_tokens = slice(0, 7) if expert == "generation" else None
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        hidden = ours.run(
            ours.embed_tokens(ids),
            list(range(7)),
            context=KVContext.empty(2),
            gen_tokens=gen_tokens,
            causal=True,
            store=True,
        )
    assert torch.allclose(hidden, expected, atol=1e-5)


def test_vision_tower_equals_transformers_siglip_with_the_conv_patch_weight():
    # The checkpoint's Linear patch embedding is the SigLIP conv weight permuted to (out, row, column, channel).
    from transformers import SiglipVisionConfig
    from transformers import SiglipVisionModel as ReferenceSiglip

    from teaserve.pipelines.bagel.config import VisionConfig
    from teaserve.pipelines.bagel.packing import grid_position_ids, patchify
    from teaserve.pipelines.bagel.vit import SiglipVisionModel

    sizes = {"hidden_size": 32, "image_size": 56, "intermediate_size": 64, "num_attention_heads": 2, "patch_size": 14}
    torch.manual_seed(0)
    ours = SiglipVisionModel(VisionConfig.from_json({**sizes, "num_hidden_layers": 3})).eval()
    reference = ReferenceSiglip(SiglipVisionConfig(**sizes, num_hidden_layers=2, vision_use_head=False)).eval()
    state = ours.vision_model.state_dict()
    name = "embeddings.patch_embedding.weight"
    state[name] = state[name].reshape(32, 14, 14, 3).permute(0, 3, 1, 2)
    reference.load_state_dict(state, strict=True)
    image = torch.randn(3, 56, 56)
    with torch.no_grad():
        expected = reference(pixel_values=image[None]).last_hidden_state[0]
        features = ours.vision_model(patchify(image, 14), grid_position_ids(4, 4, 4))
    assert torch.allclose(features, expected, atol=1e-5)


def test_autoencoder_equals_diffusers_autoencoder_kl_after_ldm_key_conversion():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from teaserve.pipelines.bagel.autoencoder import FluxAutoencoder
    from teaserve.pipelines.bagel.config import AutoencoderConfig

    torch.manual_seed(0)
    ours = FluxAutoencoder(AutoencoderConfig(channels=32, channel_multipliers=(1, 2, 2, 2), z_channels=16)).eval()
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    config = {
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 2,
        "latent_channels": 16,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": 0.3611,  # FLUX.1's
        "shift_factor": 0.1159,
    }
    reference = AutoencoderKL(**config).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(ours.state_dict(), config), strict=True)
    images, latents = torch.randn(1, 3, 64, 48), torch.randn(1, 16, 8, 6)
    with torch.no_grad():
        assert torch.allclose(ours.encoder(images), reference.encoder(images), atol=1e-5)
        assert torch.allclose(ours.decoder(latents), reference.decoder(latents), atol=1e-5)
        # A posterior sample, shifted then scaled on the way in and the inverse on the way out, as diffusers'
        # Flux pipelines use the FLUX autoencoder.
        sample = reference.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(0))
        encoded = ours.encode(images, [torch.Generator().manual_seed(0)])
        assert torch.allclose(encoded, (sample - 0.1159) * 0.3611, atol=1e-5)
        expected = reference.decode(latents / 0.3611 + 0.1159).sample
        assert torch.allclose(ours.decode(latents), expected, atol=1e-5)


def test_text_prefilled_in_two_blocks_equals_one_block(omni):
    # The causal mask of a block over a cache must be bottom-right aligned (each new token sees all cached ones).
    pipe = omni.model.pipeline
    model = pipe.transformer
    first, second = pipe.text_block("a red cat"), pipe.text_block("eating burger")
    split, joined = model.new_context(), model.new_context()
    model.prefill_text(split, first)
    model.prefill_text(split, second)
    model.prefill_text(joined, first + second)
    assert split.next_position == joined.next_position == len(first + second)
    for layer in range(len(split.keys)):
        assert torch.allclose(split.keys[layer], joined.keys[layer], atol=1e-5)
        assert torch.allclose(split.values[layer], joined.values[layer], atol=1e-5)


def test_progress_previews_are_decoded_at_the_output_size(omni):
    engine = omni.engine
    request = engine.prepare(
        {"prompt": "make it blue", "multi_modal_data": {"image": input_image()}},
        OmniDiffusionSamplingParams(num_inference_steps=STEPS, seed=1, num_outputs_per_prompt=2),
        num_previews=2,
    )
    events = []
    engine.submit(request, on_progress=events.append, block=True).result()
    previews = [event.previews for event in events if event.previews]
    assert len(previews) == 2 and all([image.size for image in p] == [(96, 64)] * 2 for p in previews)


# -- server and command line -------------------------------------------------------------------------------------
def test_http_generate_and_edit_with_the_openai_client(tiny_bagel):
    engine = AsyncEngine(str(tiny_bagel), cache_backend="tea_cache")
    from teaserve.server import build_app

    with RunningServer(build_app(engine)) as server:
        client = server.client()
        result = client.images.generate(
            prompt="a red cat", size="48x32", extra_body={"seed": 1, "num_inference_steps": 3}
        )
        assert decode_b64_image(result.data[0].b64_json).size == (48, 32)
        assert result.model_extra["cache"]["branches"].keys() == {"cond", "uncond_text"}
        edited = client.images.edit(
            image=("photo.png", png_bytes(input_image()), "image/png"),
            prompt="make it blue",
            extra_body={"seed": 1, "num_inference_steps": 3},
        )
        assert decode_b64_image(edited.data[0].b64_json).size == (96, 64)
        assert edited.model_extra["cache"]["branches"].keys() == {"cond", "uncond_text", "uncond_image"}
        too_large = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "size": "4096x4096"})
        assert too_large.status_code == 400 and "BAGEL generates sides" in too_large.json()["error"]["message"]


def test_teaserve_generate_command(tiny_bagel, tmp_path, capsys):
    from teaserve.cli.main import main

    out = tmp_path / "cat.png"
    code = main(["generate", str(tiny_bagel), "a red cat", "-o", str(out), "--size", "48x32", "--steps", "3"])
    assert code == 0 and "saved" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (48, 32)


# -- the real configuration on the meta device --------------------------------------------------------------------
# llm_config.json (= Qwen2.5-7B-Instruct) and vit_config.json of ByteDance-Seed/BAGEL-7B-MoT.
BAGEL_7B_LLM = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
}
BAGEL_7B_VIT = {
    "hidden_size": 1152,
    "image_size": 980,
    "intermediate_size": 4304,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "patch_size": 14,
}


def official_checkpoint_keys() -> dict[str, tuple[int, ...]]:
    """ema.safetensors' names and shapes as the reference loading code's module tree gives them."""
    hidden, inter, kv, head, vocab = 3584, 18944, 512, 128, 152064
    keys = {
        "language_model.model.embed_tokens.weight": (vocab, hidden),
        "language_model.model.norm.weight": (hidden,),
        "language_model.model.norm_moe_gen.weight": (hidden,),
        "language_model.lm_head.weight": (vocab, hidden),
    }
    for layer in range(28):
        prefix = f"language_model.model.layers.{layer}."
        for suffix in ("", "_moe_gen"):
            for name, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
                keys[f"{prefix}self_attn.{name}{suffix}.weight"] = (out, hidden)
                keys[f"{prefix}self_attn.{name}{suffix}.bias"] = (out,)
            keys[f"{prefix}self_attn.o_proj{suffix}.weight"] = (hidden, hidden)
            keys[f"{prefix}self_attn.q_norm{suffix}.weight"] = (head,)
            keys[f"{prefix}self_attn.k_norm{suffix}.weight"] = (head,)
            mlp = "mlp" if not suffix else "mlp_moe_gen"
            keys[f"{prefix}{mlp}.gate_proj.weight"] = keys[f"{prefix}{mlp}.up_proj.weight"] = (inter, hidden)
            keys[f"{prefix}{mlp}.down_proj.weight"] = (hidden, inter)
            keys[f"{prefix}input_layernorm{suffix}.weight"] = (hidden,)
            keys[f"{prefix}post_attention_layernorm{suffix}.weight"] = (hidden,)
    vit, vit_inter = 1152, 4304
    prefix = "vit_model.vision_model."
    keys[f"{prefix}embeddings.patch_embedding.weight"] = (vit, 14 * 14 * 3)
    keys[f"{prefix}embeddings.patch_embedding.bias"] = (vit,)
    keys[f"{prefix}embeddings.position_embedding.weight"] = (4900, vit)
    for layer in range(26):
        layer_prefix = f"{prefix}encoder.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[f"{layer_prefix}self_attn.{name}.weight"] = (vit, vit)
            keys[f"{layer_prefix}self_attn.{name}.bias"] = (vit,)
        for name in ("layer_norm1", "layer_norm2"):
            keys[f"{layer_prefix}{name}.weight"] = keys[f"{layer_prefix}{name}.bias"] = (vit,)
        keys[f"{layer_prefix}mlp.fc1.weight"], keys[f"{layer_prefix}mlp.fc1.bias"] = (vit_inter, vit), (vit_inter,)
        keys[f"{layer_prefix}mlp.fc2.weight"], keys[f"{layer_prefix}mlp.fc2.bias"] = (vit, vit_inter), (vit,)
    keys[f"{prefix}post_layernorm.weight"] = keys[f"{prefix}post_layernorm.bias"] = (vit,)
    keys.update(
        {
            "connector.fc1.weight": (hidden, vit),
            "connector.fc1.bias": (hidden,),
            "connector.fc2.weight": (hidden, hidden),
            "connector.fc2.bias": (hidden,),
            "vit_pos_embed.pos_embed": (4900, hidden),
            "latent_pos_embed.pos_embed": (4096, hidden),
            "time_embedder.mlp.0.weight": (hidden, 256),
            "time_embedder.mlp.0.bias": (hidden,),
            "time_embedder.mlp.2.weight": (hidden, hidden),
            "time_embedder.mlp.2.bias": (hidden,),
            "vae2llm.weight": (hidden, 64),
            "vae2llm.bias": (hidden,),
            "llm2vae.weight": (64, hidden),
            "llm2vae.bias": (64,),
        }
    )
    return keys


def test_the_7b_configuration_matches_the_official_checkpoint():
    from teaserve.pipelines.bagel.autoencoder import FluxAutoencoder
    from teaserve.pipelines.bagel.config import AutoencoderConfig, BagelConfig, LanguageModelConfig, VisionConfig
    from teaserve.pipelines.bagel.model import BagelModel

    config = BagelConfig(
        llm=LanguageModelConfig.from_json(BAGEL_7B_LLM),
        vit=VisionConfig.from_json(BAGEL_7B_VIT),
        autoencoder=AutoencoderConfig(),
        max_latent_size=64,
        vit_max_num_patch_per_side=70,
    )
    with torch.device("meta"):
        model = BagelModel(config)
        autoencoder = FluxAutoencoder(config.autoencoder)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == official_checkpoint_keys()

    def count(predicate=lambda name: True) -> int:
        return sum(np.prod(shape) for name, shape in shapes.items() if predicate(name))

    assert count() == 14_607_260_128  # ema.safetensors: 29.2 GB in bfloat16
    assert count(lambda n: n.startswith("language_model.")) == 14_141_252_608  # "14B total"
    layers = "language_model.model.layers."
    assert count(lambda n: n.startswith(layers) and "moe_gen" not in n) == 6_525_625_344  # each expert stack
    assert count(lambda n: n.startswith(layers) and "moe_gen" in n) == 6_525_625_344
    # "7B active": a token runs one expert: Qwen2.5-7B's 7,615,616,512 plus the q/k norms BAGEL adds
    active = count(lambda n: n.startswith("language_model.") and "moe_gen" not in n)
    assert active == 7_615_616_512 + 28 * 2 * 128
    assert count(lambda n: n.startswith("vit_model.")) == 402_552_736
    ae_names = set(autoencoder.state_dict())
    assert sum(t.numel() for t in autoencoder.state_dict().values()) == 83_819_683
    assert {
        "encoder.mid.attn_1.q.weight",
        "decoder.up.3.upsample.conv.weight",
        "encoder.down.2.downsample.conv.bias",
    } <= ae_names
    assert not any(re.match(r"decoder\.up\.0\.upsample|encoder\.down\.3\.downsample", n) for n in ae_names)
    assert autoencoder.state_dict()["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
