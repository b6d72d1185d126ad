"""Training of the embedded default video model: a small Wan2.1-architecture pipeline that draws moving shapes.

Every component is a stock library class, trained (or, for the text encoder, frozen at random) on the procedural
clips, deterministically from one seed:

1. `AutoencoderKLWan` with two downsampling stages, both also temporal (4x in space and in time: 17 frames of
   32x32 become 5 latent frames of 8x8), inflated from the embedded image model's VAE without training (see
   `inflate_image_vae`);
2. the latents of a pool of 17-frame training clips, normalised with their measured mean and std (written into
   the VAE config, exactly as the pipeline undoes it);
3. a frozen random `UMT5EncoderModel` with an offline T5 tokenizer whose vocabulary is the captions' words; the
   pipeline's own `encode_prompt` embeds every caption;
4. `WanTransformer3DModel` trained by flow matching with the noise levels of Wan's UniPC scheduler (its flow
   shift), with prompt dropout to the blank negative prompt so that classifier-free guidance works; the
   exponential moving average of its weights is what ships.

    teaserve train-default-video --out /tmp/shapes-wan
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..default_model import default_model_path
from ..default_model.train import bfloat16_psnrs, cosine_lr, psnr, training_noise_levels, update_ema
from ..loading import write_profile
from ..offline_tokenizers import build_t5_tokenizer
from . import SERVED_MODEL_NAME, clips

NEGATIVE_PROMPT = " "
TEXT_LENGTH = 512
"""WanPipeline's default max_sequence_length: every prompt is zero-padded to this many tokens."""
NUM_INFERENCE_STEPS = 25
GUIDANCE_SCALE = 5.0


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 0
    threads: int = 2
    latent_pool: int = 2400
    # text side (frozen, random)
    text_dim: int = 64
    text_layers: int = 2
    # transformer
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 512
    transformer_steps: int = 5000
    transformer_batch: int = 32
    transformer_lr: float = 8e-4
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    flow_shift: float = 3.0

    def scaled(self, factor: float) -> TrainingConfig:
        """The same recipe with the transformer's step count and the latent pool scaled, for quick trials."""
        return replace(
            self,
            latent_pool=max(64, int(self.latent_pool * factor)),
            transformer_steps=max(1, int(self.transformer_steps * factor)),
        )


def _to_tensor(videos: np.ndarray) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1], the VAE's input layout."""
    return torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)


def inflate_image_vae():
    """The embedded image model's VAE as a Wan video VAE that also compresses time 4x, without training.

    Its `AutoencoderKLQwenImage` is the Wan 2.1 VAE architecture, trained on single frames of shapes in the same
    palette; a single frame only ever reaches the newest time tap of its causal convolutions. Zeroing the older
    taps makes every convolution act frame by frame, and the temporal resamplers (one more than the image VAE
    has) start as exact frame picking: the encoder keeps every other frame, the decoder repeats each latent frame.
    A latent frame then holds one of its four frames, which moves a shape by under a pixel: the clips' checker
    reads the reconstructions as well as the renders."""
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    image_vae = AutoencoderKLQwenImage.from_pretrained(default_model_path() / "vae", torch_dtype=torch.float32)
    source = image_vae.config
    vae = AutoencoderKLWan(
        base_dim=source.base_dim, z_dim=source.z_dim, dim_mult=source.dim_mult, num_res_blocks=source.num_res_blocks,
        temperal_downsample=[True] * len(source.temperal_downsample), latents_mean=[0.0] * source.z_dim,
        latents_std=[1.0] * source.z_dim, scale_factor_spatial=4, scale_factor_temporal=4,
    )  # fmt: skip
    vae.load_state_dict(image_vae.state_dict(), strict=False)  # the new temporal resamplers are set below
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, WanResample) and hasattr(module, "time_conv"):
                weight = module.time_conv.weight  # (copies x channels, channels, 3, 1, 1)
                channels = weight.shape[1]
                weight.zero_()
                module.time_conv.bias.zero_()
                for copy_index in range(weight.shape[0] // channels):
                    weight[copy_index * channels : (copy_index + 1) * channels, :, -1, 0, 0] = torch.eye(channels)
            elif isinstance(module, WanCausalConv3d):
                module.weight[:, :, :-1] = 0
    return vae.eval().requires_grad_(False)


def reconstruction_quality(vae, count: int = 32, seed: int = 99) -> dict[str, float]:
    """PSNR of the VAE's reconstructions of held-out clips, and the fraction the clips' checker reads right."""
    _, held_out = clips.split_clips()
    videos, chosen = clips.sample(count, held_out, seed=seed)
    target = _to_tensor(videos)
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(target).latent_dist.mode()).sample.clamp(-1, 1)
    frames = reconstruction.add(1).div(2).permute(0, 2, 3, 4, 1).numpy()
    return {
        "psnr": psnr(reconstruction, target),
        "checker_passed": float(np.mean([clips.check(f, c).passed for f, c in zip(frames, chosen, strict=True)])),
        "clips": count,
    }


def encode_pool(vae, config: TrainingConfig) -> tuple[torch.Tensor, list[clips.Clip]]:
    """Posterior means of a pool of 17-frame training clips, normalised; the VAE config records mean and std."""
    train_clips, _ = clips.split_clips()
    chunks, chosen = [], []
    with torch.no_grad():
        for start in range(0, config.latent_pool, 64):
            count = min(64, config.latent_pool - start)
            videos, batch_clips = clips.sample(count, train_clips, seed=config.seed * 9_000_011 + start)
            chunks.append(vae.encode(_to_tensor(videos)).latent_dist.mode())
            chosen += batch_clips
    latents = torch.cat(chunks)
    mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    return (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), chosen


def caption_texts() -> list[str]:
    return [clip.caption for clip in clips.all_clips()] + [NEGATIVE_PROMPT]


NEIGHBOUR_BUCKETS = (1, 9, 2, 10)
"""The relative-position bucket each text attention head looks at: the previous, next, second previous and second
next token (T5's bidirectional buckets with 16 of them: offset -d is bucket d, offset +d is bucket 8 + d)."""
NEIGHBOUR_BIAS = 10.0


def build_text_side(config: TrainingConfig):
    """Offline T5 tokenizer of the captions' words, and a small frozen random UMT5 text encoder whose attention
    heads each look at one fixed neighbour.

    Wan's cross-attention gives the text tokens no positions: the transformer sees the set of their embeddings. With
    random attention, a T5 encoder mixes every token with all the others alike, and the set hardly changes when two
    words swap places: "a red circle ... on a blue background" against "a blue circle ... on a red background", or
    "left to right" against "right to left", differ about a tenth as much as captions with another colour do.
    Relative-position biases that make each head attend to one neighbour give every token an embedding of the words
    around it, and those captions apart as much as any two."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_t5_tokenizer(caption_texts())
    heads = len(NEIGHBOUR_BUCKETS)
    torch.manual_seed(config.seed + 1)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=(len(tokenizer) + 63) // 64 * 64,
            d_model=config.text_dim,
            d_kv=config.text_dim // heads,
            d_ff=config.text_dim * 2,
            num_layers=config.text_layers,
            num_heads=heads,
            relative_attention_num_buckets=16,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
        )
    ).eval()
    with torch.no_grad():
        for block in text_encoder.encoder.block:
            bias = block.layer[0].SelfAttention.relative_attention_bias.weight  # (buckets, heads)
            bias.zero_()
            for head, bucket in enumerate(NEIGHBOUR_BUCKETS):
                bias[bucket, head] = NEIGHBOUR_BIAS
    return tokenizer, text_encoder


def wan_scheduler(flow_shift: float):
    """Wan2.1's scheduler configuration (UniPC on flow sigmas), with this model's flow shift."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift
    )


def embed_captions(pipeline, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every text through the pipeline's own encode_prompt (zero-padded to TEXT_LENGTH tokens), collapsed for
    training: the real tokens, then one zero token per missing row up to the longest text plus one; and the
    attention bias that makes a key over them weigh exactly as over the full padding (see `collapsed_padding`)."""
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(texts), 256):
            batch, _ = pipeline.encode_prompt(
                texts[start : start + 256], do_classifier_free_guidance=False, max_sequence_length=TEXT_LENGTH,
                device="cpu",
            )  # fmt: skip
            lengths = (batch != 0).any(-1).sum(1)
            embeddings += [batch[i, : int(length)].clone() for i, length in enumerate(lengths)]
    rows = max(len(e) for e in embeddings) + 1
    collapsed = torch.zeros(len(embeddings), rows, embeddings[0].shape[1])
    bias = torch.zeros(len(embeddings), rows)
    for index, embedding in enumerate(embeddings):
        collapsed[index, : len(embedding)] = embedding
        # the pipeline's TEXT_LENGTH - len padding rows are identical keys: the rows - len here stand for them
        bias[index, len(embedding) :] = math.log((TEXT_LENGTH - len(embedding)) / (rows - len(embedding)))
    return collapsed, bias


class _BiasedCrossAttention:
    """Wan's attention processor with an additive attention bias over the keys (set before each forward)."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.processor(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)


@contextmanager
def collapsed_padding(transformer) -> Iterator[_BiasedCrossAttention]:
    """Training-time speed-up: WanPipeline zero-pads every prompt to 512 tokens, and the transformer's text
    projection maps every zero row to the same key and value. Attention over n identical keys equals attention
    over one of them with log(n) added to its logit, so training attends over the real tokens and a few padding
    rows whose bias makes them weigh as the full padding: the same function, a fraction of the work."""
    processor = _BiasedCrossAttention(transformer.blocks[0].attn2.processor)
    originals = [block.attn2.processor for block in transformer.blocks]
    for block in transformer.blocks:
        block.attn2.set_processor(processor)
    try:
        yield processor
    finally:
        for block, original in zip(transformer.blocks, originals, strict=True):
            block.attn2.set_processor(original)


def build_transformer(config: TrainingConfig, z_dim: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(config.seed + 2)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=config.heads, attention_head_dim=config.head_dim,
        in_channels=z_dim, out_channels=z_dim, text_dim=config.text_dim, freq_dim=256,
        ffn_dim=config.ffn_dim, num_layers=config.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )  # fmt: skip


def train_transformer(config: TrainingConfig, pipeline, latents: torch.Tensor, pool: list[clips.Clip], log):
    """Flow matching on the latents, with the noise levels of the inference scheduler's flow shift."""
    texts = caption_texts()
    embeddings, biases = embed_captions(pipeline, texts)
    caption_index = {text: index for index, text in enumerate(texts)}
    sample_captions = torch.tensor([caption_index[clip.caption] for clip in pool])
    negative = caption_index[NEGATIVE_PROMPT]
    count = len(latents)

    transformer = build_transformer(config, latents.shape[1])
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.transformer_lr, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(config.seed + 3)
    _, _, frames, height, width = latents.shape
    log(
        f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters, "
        f"{frames * height * width // 4} video tokens, {embeddings.shape[1]} text rows standing for {TEXT_LENGTH}"
    )
    smoothed = None
    shift = config.flow_shift
    with collapsed_padding(transformer) as cross_attention:
        for step in range(config.transformer_steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config.transformer_lr, step, config.transformer_steps, warmup=200)
            batch = config.transformer_batch
            index = torch.randint(0, count, (batch,), generator=generator)
            captions = sample_captions[index].clone()
            captions[torch.rand(batch, generator=generator) < config.prompt_dropout] = negative
            u = training_noise_levels(batch, generator)
            sigma = shift * u / (1 + (shift - 1) * u)  # the scheduler's flow shift
            clean = latents[index]
            noise = torch.randn(clean.shape, generator=generator)
            noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1, 1) * noise
            cross_attention.bias = biases[captions].view(batch, 1, 1, -1)
            prediction = transformer(
                hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeddings[captions],
                return_dict=False,
            )[0]  # fmt: skip
            loss = (prediction - (noise - clean)).pow(2).mean()  # flow prediction: x0 = x_t - sigma * v
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            optimizer.step()
            update_ema(ema, transformer, step, config.ema_decay)
            smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
            if (step + 1) % 250 == 0 or step + 1 == config.transformer_steps:
                log(f"transformer step {step + 1}/{config.transformer_steps}: loss {smoothed:.4f}")
    return ema


def generate(pipeline, captions: list[str], *, steps: int = NUM_INFERENCE_STEPS, seed: int = 0) -> np.ndarray:
    """Clips of `captions` with the model's default sampling (clip i uses seed + i): float (B, F, H, W, 3) in
    [0, 1]."""
    return pipeline(
        prompt=captions, negative_prompt=[NEGATIVE_PROMPT] * len(captions), guidance_scale=GUIDANCE_SCALE,
        num_inference_steps=steps, width=clips.FRAME_SIZE, height=clips.FRAME_SIZE, num_frames=clips.NUM_FRAMES,
        output_type="np", generator=[torch.Generator().manual_seed(seed + i) for i in range(len(captions))],
    ).frames  # fmt: skip


def half_precision_fidelity(pipeline, count: int = 8) -> dict[str, float]:
    """`bfloat16_psnrs` of held-out captions' clips with the default sampling."""
    _, held_out = clips.split_clips()
    captions = [clip.caption for clip in held_out[:count]]
    psnrs = bfloat16_psnrs(pipeline, lambda: generate(pipeline, captions))
    return {"psnr_mean": float(np.mean(psnrs)), "psnr_min": float(np.min(psnrs)), "clips": count}


def train(config: TrainingConfig, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Run the whole recipe and save the pipeline (bfloat16 weights) with its teaserve.json profile to `out`."""
    from diffusers import WanPipeline

    torch.set_num_threads(config.threads)
    out = Path(out)
    timings: dict[str, float] = {}
    cpu_timings: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), time.process_time()

    def stage(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        cpu_timings[name] = round(time.process_time() - cpu_started - sum(cpu_timings.values()), 1)
        log(f"[{name}] done after {timings[name]:.0f} s, {cpu_timings[name]:.0f} CPU s")

    vae = inflate_image_vae()
    reconstruction = reconstruction_quality(vae)
    log(f"VAE on held-out clips: PSNR {reconstruction['psnr']:.1f} dB, checker {reconstruction['checker_passed']:.0%}")
    latents, pool = encode_pool(vae, config)
    stage("latents")
    tokenizer, text_encoder = build_text_side(config)
    pipeline = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=wan_scheduler(config.flow_shift),
        transformer=None,
    )  # fmt: skip
    pipeline.register_modules(transformer=train_transformer(config, pipeline, latents, pool, log))
    stage("transformer")
    pipeline.set_progress_bar_config(disable=True)
    fidelity = half_precision_fidelity(pipeline)
    log(
        f"bfloat16 weights against float32: PSNR mean {fidelity['psnr_mean']:.1f} dB, min {fidelity['psnr_min']:.1f} dB"
    )
    pipeline.save_pretrained(out)
    write_profile(
        out,
        served_model_name=SERVED_MODEL_NAME,
        defaults={"num_inference_steps": NUM_INFERENCE_STEPS, "true_cfg_scale": GUIDANCE_SCALE,
                  "negative_prompt": NEGATIVE_PROMPT, "width": clips.FRAME_SIZE, "height": clips.FRAME_SIZE,
                  "num_frames": clips.NUM_FRAMES, "fps": clips.FPS},
    )  # fmt: skip
    record = {
        "config": asdict(config),
        "seconds": timings,
        "cpu_seconds": cpu_timings,
        "total_seconds": round(time.perf_counter() - started),
        "total_cpu_seconds": round(time.process_time() - cpu_started),
        "vae_reconstruction": reconstruction,
        "bfloat16_fidelity": fidelity,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out} after {time.perf_counter() - started:.0f} s")
    return out
