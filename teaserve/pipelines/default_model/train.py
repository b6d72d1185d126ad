"""Training of the embedded default model: a small Qwen-Image-architecture pipeline that draws shapes.

Every component is a stock library class, trained (or, for the text encoder, frozen at random) on the procedural
shapes data set, deterministically from one seed:

1. `AutoencoderKLQwenImage` (4x downsampling) trained as an autoencoder on rendered scenes;
2. the latents of a pool of training scenes, normalised with their measured mean and std (written into the VAE
   config, exactly as the pipeline undoes it);
3. a frozen random `Qwen2_5_VLForConditionalGeneration` text encoder with an offline tokenizer whose vocabulary
   is the Qwen-Image templates and the captions; the pipeline's own `encode_prompt` embeds every caption;
4. `QwenImageTransformer2DModel` trained by flow matching with the noise levels the pipeline's scheduler uses at
   inference (exponential shift of Qwen-Image's scheduler at this image size), with prompt dropout to the blank
   negative prompt so that true CFG works; the exponential moving average of its weights is what ships;
5. the VAE decoder fine-tuned on fresh renders with the encoder frozen (sharper edges, same latent space).

    teaserve train-default --out /tmp/shapes-model        # about 50 minutes on 2 CPU cores
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
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio

from ..loading import write_profile
from ..offline_tokenizers import QWEN2_SPECIAL_TOKENS, build_qwen2_tokenizer
from . import SERVED_MODEL_NAME, shapes

NEGATIVE_PROMPT = " "


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 0
    threads: int = 2
    # autoencoder
    vae_base_dim: int = 16
    z_dim: int = 8
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    latent_pool: int = 24000
    # text side (frozen, random)
    text_hidden: int = 64
    text_layers: int = 2
    # transformer
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    transformer_steps: int = 6000
    transformer_batch: int = 64
    transformer_lr: float = 8e-4
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    # decoder fine-tune
    decoder_steps: int = 1000
    decoder_lr: float = 3e-4

    def scaled(self, factor: float) -> TrainingConfig:
        """The same recipe with every stage's step count (and the latent pool) scaled, for quick trials."""
        return replace(
            self,
            vae_steps=max(1, int(self.vae_steps * factor)),
            latent_pool=max(64, int(self.latent_pool * factor)),
            transformer_steps=max(1, int(self.transformer_steps * factor)),
            decoder_steps=max(1, int(self.decoder_steps * factor)),
        )


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, 1, H, W) in [-1, 1], the VAE's input layout."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).unsqueeze(2)


@contextmanager
def single_frame_convolutions() -> Iterator[None]:
    """Training-time speed-up: for a one-frame input without cache, QwenImageCausalConv3d's 3x3x3 convolution over
    two zero-padded frames equals a 2-D convolution with the kernel's last temporal slice; a third of the work."""
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as module

    original = module.QwenImageCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if cache_x is not None or x.shape[2] != 1:
            return original(self, x, cache_x)
        pad = self._padding
        frame = F.pad(x[:, :, 0], (pad[0], pad[1], pad[2], pad[3])) if (pad[0] or pad[2]) else x[:, :, 0]
        return F.conv2d(frame, self.weight[:, :, -1], self.bias, stride=self.stride[1:]).unsqueeze(2)

    module.QwenImageCausalConv3d.forward = forward
    try:
        yield
    finally:
        module.QwenImageCausalConv3d.forward = original


def cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from `base` down to a tenth of it at `total`."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, total))))


def training_noise_levels(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Unshifted noise levels in (0, 1) for flow-matching training: logit-normal, 10% of them uniform."""
    u = torch.sigmoid(torch.randn(batch, generator=generator))
    u = torch.where(torch.rand(batch, generator=generator) < 0.1, torch.rand(batch, generator=generator), u)
    return u.clamp(1e-4, 1 - 1e-4)


def update_ema(average: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """One step of the exponential moving average of `model`'s weights, with a warm-up of the decay."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for averaged, current in zip(average.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current, 1 - decay)


def autoencoder_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + MSE: L1 keeps edges sharp, MSE weighs the large errors."""
    return (reconstruction - target).abs().mean() + (reconstruction - target).pow(2).mean()


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean PSNR per image (or video: per row of the batch) of values in [-1, 1]."""
    dims = tuple(range(1, target.ndim))
    return float(peak_signal_noise_ratio(reconstruction.clamp(-1, 1), target, data_range=2.0, dim=dims))


def train_vae(config: TrainingConfig, log: Callable[[str], None]):
    from diffusers import AutoencoderKLQwenImage

    z = config.z_dim
    torch.manual_seed(config.seed)
    vae = AutoencoderKLQwenImage(
        base_dim=config.vae_base_dim, z_dim=z, dim_mult=[1, 2, 4], num_res_blocks=1,
        temperal_downsample=[False, True], latents_mean=[0.0] * z, latents_std=[1.0] * z,
    )  # fmt: skip
    train_scenes, held_out = shapes.split_scenes()
    validation = _to_tensor(shapes.sample(128, held_out, seed=config.seed + 99)[0])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    vae.train()
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config.vae_lr, step, config.vae_steps, warmup=100)
        images = _to_tensor(shapes.sample(config.vae_batch, train_scenes, seed=config.seed * 1_000_003 + step)[0])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = autoencoder_loss(reconstruction, images) + 1e-6 * posterior.kl().mean() / images[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 400 == 0 or step + 1 == config.vae_steps:
            quality = _vae_psnr(vae, validation)
            log(f"vae step {step + 1}/{config.vae_steps}: loss {loss.item():.4f}, held-out PSNR {quality:.2f} dB")
    return vae.eval()


def _vae_psnr(vae, images: torch.Tensor) -> float:
    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        value = psnr(vae.decode(vae.encode(images).latent_dist.mode()).sample, images)
    vae.train(was_training)
    return value


def encode_pool(vae, config: TrainingConfig) -> tuple[torch.Tensor, list[shapes.Scene]]:
    """Posterior means of a pool of training renders, normalised; the VAE config records mean and std."""
    train_scenes, _ = shapes.split_scenes()
    images, scenes = shapes.sample(config.latent_pool, train_scenes, seed=config.seed + 7)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            chunks.append(vae.encode(_to_tensor(images[start : start + 256])).latent_dist.mode()[:, :, 0])
    latents = torch.cat(chunks)
    mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    return (latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), scenes


def caption_texts() -> list[str]:
    return [scene.caption for scene in shapes.all_scenes()] + [NEGATIVE_PROMPT]


def build_text_side(config: TrainingConfig):
    """Offline tokenizer with a compact vocabulary, and a small frozen random Qwen2.5-VL text encoder."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen2_tokenizer(caption_texts(), compact=True)
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_SPECIAL_TOKENS}
    vocab_size = (max(special.values()) + 1 + 63) // 64 * 64
    heads = 4
    half_head = config.text_hidden // heads // 2
    torch.manual_seed(config.seed + 1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": config.text_hidden,
                "intermediate_size": config.text_hidden * 2,
                "num_hidden_layers": config.text_layers,
                "num_attention_heads": heads,
                "num_key_value_heads": 2,
                "vocab_size": vocab_size,
                "rope_scaling": {
                    "mrope_section": [half_head - 2 * (half_head // 3), half_head // 3, half_head // 3],
                    "rope_type": "default",
                    "type": "default",
                },
                "rope_theta": 1000000.0,
                "bos_token_id": special["<|endoftext|>"],
                "eos_token_id": special["<|im_end|>"],
                "pad_token_id": special["<|endoftext|>"],
                "tie_word_embeddings": True,
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": config.text_hidden,
            },
            vocab_size=vocab_size,
            image_token_id=special["<|image_pad|>"],
            video_token_id=special["<|video_pad|>"],
            vision_start_token_id=special["<|vision_start|>"],
            vision_end_token_id=special["<|vision_end|>"],
            tie_word_embeddings=True,
        )
    ).eval()
    return tokenizer, text_encoder


def qwen_image_scheduler():
    """Qwen-Image's scheduler configuration: dynamic exponential shift with a terminal value."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip


def embed_captions(pipeline, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every text through the pipeline's own encode_prompt: padded embeddings (N, L, D) and masks (N, L)."""
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(texts), 256):
            batch, mask = pipeline.encode_prompt(texts[start : start + 256], device="cpu")
            lengths = mask.sum(1) if mask is not None else [batch.shape[1]] * batch.shape[0]
            embeddings += [batch[i, : int(length)].clone() for i, length in enumerate(lengths)]
    longest = max(len(e) for e in embeddings)
    padded = torch.zeros(len(embeddings), longest, embeddings[0].shape[1])
    masks = torch.zeros(len(embeddings), longest, dtype=torch.long)
    for index, embedding in enumerate(embeddings):
        padded[index, : len(embedding)] = embedding
        masks[index, : len(embedding)] = 1
    return padded, masks


def train_transformer(config, pipeline, latents, scenes, log):
    """Flow matching on packed latents, with the noise levels of the inference scheduler."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    z = config.z_dim
    count, _, height, width = latents.shape
    packed = QwenImagePipeline._pack_latents(latents, count, z, height, width)
    image_shapes = [(1, height // 2, width // 2)]
    scheduler = pipeline.scheduler.config
    mu = calculate_shift(
        packed.shape[1], scheduler.base_image_seq_len, scheduler.max_image_seq_len, scheduler.base_shift,
        scheduler.max_shift,
    )  # fmt: skip
    texts = caption_texts()
    embeddings, masks = embed_captions(pipeline, texts)
    caption_index = {text: index for index, text in enumerate(texts)}
    sample_captions = torch.tensor([caption_index[scene.caption] for scene in scenes])
    negative = caption_index[NEGATIVE_PROMPT]

    torch.manual_seed(config.seed + 2)
    quarter = config.head_dim // 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z, out_channels=z, num_layers=config.layers,
        attention_head_dim=config.head_dim, num_attention_heads=config.heads,
        joint_attention_dim=config.text_hidden, guidance_embeds=False,
        axes_dims_rope=(quarter, (config.head_dim - quarter) // 2, (config.head_dim - quarter) // 2),
    )  # fmt: skip
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.transformer_lr, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(config.seed + 3)
    log(
        f"transformer: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M parameters, "
        f"{packed.shape[1]} image tokens, shift mu {mu:.3f}"
    )
    smoothed = None
    for step in range(config.transformer_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config.transformer_lr, step, config.transformer_steps, warmup=200)
        batch = config.transformer_batch
        index = torch.randint(0, count, (batch,), generator=generator)
        captions = sample_captions[index].clone()
        captions[torch.rand(batch, generator=generator) < config.prompt_dropout] = negative
        mask = masks[captions]
        length = int(mask.sum(1).max())
        # the exponential shift the scheduler applies at inference
        u = training_noise_levels(batch, generator)
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        clean = packed[index]
        noise = torch.randn(clean.shape, generator=generator)
        noisy = (1 - sigma.view(-1, 1, 1)) * clean + sigma.view(-1, 1, 1) * noise
        prediction = transformer(
            hidden_states=noisy, timestep=sigma, encoder_hidden_states=embeddings[captions, :length],
            encoder_hidden_states_mask=mask[:, :length], img_shapes=[image_shapes] * batch, return_dict=False,
        )[0]  # fmt: skip
        loss = (prediction - (noise - clean)).pow(2).mean()  # the scheduler steps x += (s_next - s) * v
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, transformer, step, config.ema_decay)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        if (step + 1) % 500 == 0 or step + 1 == config.transformer_steps:
            log(f"transformer step {step + 1}/{config.transformer_steps}: loss {smoothed:.4f}")
    return ema


def finetune_decoder(vae, config: TrainingConfig, log: Callable[[str], None]) -> None:
    """Sharpen the decoder on fresh renders; the encoder, and so the latent space, stays as trained."""
    train_scenes, held_out = shapes.split_scenes()
    validation = _to_tensor(shapes.sample(128, held_out, seed=config.seed + 99)[0])
    decoder_parameters = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    optimizer = torch.optim.AdamW(decoder_parameters, lr=config.decoder_lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train()
    for step in range(config.decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(config.decoder_lr, step, config.decoder_steps, warmup=20)
        images = _to_tensor(shapes.sample(config.vae_batch, train_scenes, seed=config.seed * 7_000_003 + step)[0])
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mode()
        loss = autoencoder_loss(vae.decode(latents).sample, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder_parameters, 1.0)
        optimizer.step()
        if (step + 1) % 400 == 0 or step + 1 == config.decoder_steps:
            log(f"decoder step {step + 1}/{config.decoder_steps}: held-out PSNR {_vae_psnr(vae, validation):.2f} dB")
    vae.eval()


def bfloat16_psnrs(pipeline, generate: Callable[[], np.ndarray]) -> list[float]:
    """Round the transformer, VAE and text encoder to bfloat16 (as shipped; the pipeline keeps those weights) and
    measure how much `generate`'s outputs (floats in [0, 1], one output per row) change against float32: the PSNR of
    each output's 8-bit values, identical outputs (infinite PSNR) counting as 100 dB."""
    modules = (pipeline.transformer, pipeline.vae, pipeline.text_encoder)
    reference = np.round(generate() * 255).astype(np.float64)
    for module in modules:
        module.to(torch.bfloat16).to(torch.float32)  # the values a float32 load of the saved weights gives
    rounded = np.round(generate() * 255).astype(np.float64)
    per_output = peak_signal_noise_ratio(
        torch.from_numpy(rounded), torch.from_numpy(reference), data_range=255.0, reduction="none",
        dim=tuple(range(1, reference.ndim)),
    )  # fmt: skip
    for module in modules:
        module.to(torch.bfloat16)
    return per_output.clamp(max=100.0).tolist()


def half_precision_fidelity(pipeline, count: int = 8) -> dict[str, float]:
    """`bfloat16_psnrs` of held-out captions with the default sampling."""
    _, held_out = shapes.split_scenes()
    captions = [scene.caption for scene in held_out[:count]]

    def generate() -> np.ndarray:
        return pipeline(
            prompt=captions, negative_prompt=[NEGATIVE_PROMPT] * count, true_cfg_scale=4.0, num_inference_steps=30,
            width=shapes.IMAGE_SIZE, height=shapes.IMAGE_SIZE, output_type="np",
            generator=[torch.Generator().manual_seed(index) for index in range(count)],
        ).images  # fmt: skip

    psnrs = bfloat16_psnrs(pipeline, generate)
    return {"psnr_mean": float(np.mean(psnrs)), "psnr_min": float(np.min(psnrs)), "images": count}


def train(config: TrainingConfig, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Run the whole recipe and save the pipeline (bfloat16 weights) with its teaserve.json profile to `out`."""
    from diffusers import QwenImagePipeline

    torch.set_num_threads(config.threads)
    out = Path(out)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)
        log(f"[{name}] done after {timings[name]:.0f} s (total {time.perf_counter() - started:.0f} s)")

    with single_frame_convolutions():
        vae = train_vae(config, log)
        stage("vae")
        latents, scenes = encode_pool(vae, config)
        stage("latents")
        tokenizer, text_encoder = build_text_side(config)
        pipeline = QwenImagePipeline(
            scheduler=qwen_image_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            transformer=None,
        )  # fmt: skip
        pipeline.register_modules(transformer=train_transformer(config, pipeline, latents, scenes, log))
        stage("transformer")
        finetune_decoder(vae, config, log)
        stage("decoder")
    fidelity = half_precision_fidelity(pipeline)
    log(
        f"bfloat16 weights against float32: PSNR mean {fidelity['psnr_mean']:.1f} dB, min {fidelity['psnr_min']:.1f} dB"
    )
    pipeline.save_pretrained(out)
    write_profile(
        out,
        served_model_name=SERVED_MODEL_NAME,
        defaults={"width": shapes.IMAGE_SIZE, "height": shapes.IMAGE_SIZE, "num_inference_steps": 30,
                  "true_cfg_scale": 4.0, "negative_prompt": NEGATIVE_PROMPT},
    )  # fmt: skip
    record = {
        "config": asdict(config),
        "seconds": timings,
        "total_seconds": round(time.perf_counter() - started),
        "bfloat16_fidelity": fidelity,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out} after {time.perf_counter() - started:.0f} s")
    return out
