"""Train `dgrun:default` (UNet) and `dgrun:default-dit` (SD3 transformer) from scratch on 2 CPU cores.

    python -m dgrun.models.train                 # both models into dgrun/models/weights/
    python -m dgrun.models.train --which unet --steps unet=3000
    python -m dgrun.models.train --quick --out /tmp/m --work /tmp/w   # a smoke test in seconds

Phases: VAE on freshly drawn pictures → the data set encoded once to latents → UNet and its text encoder
→ SD3 transformer and its two text encoders. Every phase checkpoints into `--work`, so a rerun resumes
where a crash stopped; every random draw comes from (seed, phase, step), so a resumed run is the same run
(a rerun reproduced the VAE and its latents bit for bit). Steps, not minutes, set the budget: on 2 idle
cores the whole run took 35 min (2124 s); with other jobs on the same cores it took 71 min to 2 h 7 min.
The bits also depend on the CPU's instruction set and the thread count, so `training.json` records them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dgrun.machine import choose_wait_policy
from dgrun.models import architecture as arch
from dgrun.models import shapes
from dgrun.models.trainkit import (
    Checkpoint,
    Console,
    Ema,
    PadBiasJointAttention,
    due,
    optimize,
)
from dgrun.quiet import quiet_libraries

_VERSION = 1  # bump when a change makes old checkpoints meaningless
_PHASES = {"vae": 1, "latents": 2, "unet": 3, "dit": 4}


@dataclass(frozen=True)
class Budget:
    """Everything that decides the trained weights; checkpoints are reused only when it is unchanged."""

    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 16
    samples: int = 30_000
    unet_steps: int = 4500
    dit_steps: int = 6000
    batch: int = 32
    lr: float = 1e-3
    eval_every: int = 500
    eval_prompts: int = 18
    eval_steps: int = 20
    check_images: int = 60  # held-out pictures the VAE reconstructs at each evaluation


QUICK = Budget(
    vae_steps=3, vae_batch=4, samples=32, unet_steps=3, dit_steps=3, batch=4, eval_every=2,
    eval_prompts=2, eval_steps=2, check_images=4,
)  # fmt: skip


# ------------------------------------------------------------------------------------------ helpers
def _generator(budget: Budget, phase: str, step: int) -> Any:
    import torch

    return torch.Generator().manual_seed(budget.seed * 1_000_003 + _PHASES[phase] * 10_000_019 + step)


def _rng(budget: Budget, phase: str, step: int) -> np.random.Generator:
    return np.random.default_rng([budget.seed, _PHASES[phase], step])


def _lr(budget: Budget, step: int, total: int, warmup: int = 100) -> float:
    """Linear warmup, then cosine from lr down to lr / 10."""
    if step < warmup:
        return budget.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return budget.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def _to_pixels(images: np.ndarray) -> Any:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------- phases
def train_vae(budget: Budget, work: Path, ui: Console) -> Any:
    """Autoencoder on fresh pictures every step: L1 + MSE, and a KL term only to keep latents bounded."""
    import torch

    torch.manual_seed(budget.seed)
    vae = arch.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=budget.lr, weight_decay=0.0)
    ckpt = Checkpoint(
        work, "vae", {"seed": budget.seed, "steps": budget.vae_steps, "batch": budget.vae_batch}, _VERSION
    )
    start = _resume(ckpt, {"vae": vae}, optimizer)
    with ui.progress() as bar:
        task = bar.add_task("vae", total=budget.vae_steps, completed=start, info="")
        for step in range(start, budget.vae_steps):
            pixels = _to_pixels(shapes.make_batch(_rng(budget, "vae", step), budget.vae_batch)[0])
            posterior = vae.encode(pixels).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=_generator(budget, "vae", step))
            decoded = vae.decode(posterior.mean + posterior.std * noise).sample
            error = decoded - pixels
            loss = error.abs().mean() + error.pow(2).mean() + 1e-6 * posterior.kl().mean()
            optimize(optimizer, loss, _lr(budget, step, budget.vae_steps, warmup=50))
            ui.advance(bar, task, f"loss {loss.item():.4f}")
            if due(step, budget.vae_steps, budget.eval_every):
                ckpt.save(step=step + 1, vae=vae.state_dict(), optimizer=optimizer.state_dict())
                ui.print(f"vae step {step + 1}: reconstructions {_vae_check(budget, vae)}")
    ui.spent["vae"] = ckpt.seconds
    return vae.eval().requires_grad_(False)


def _vae_check(budget: Budget, vae: Any) -> str:
    """Reconstruction error and the evaluator's verdict on reconstructed held-out pictures."""
    import torch

    images, prompts = shapes.make_batch(np.random.default_rng([budget.seed, 99]), budget.check_images)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(_to_pixels(images)).latent_dist.mean).sample
    mse = float((decoded - _to_pixels(images)).pow(2).mean())
    pixels = decoded.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return f"mse {mse:.4f} {shapes.format_scores(shapes.score(zip(prompts, pixels, strict=True)))}"


def _resume(ckpt: Checkpoint, models: dict[str, Any], optimizer: Any, ema: Ema | None = None) -> int:
    state = ckpt.load()
    if state is None:
        return 0
    for name, model in models.items():
        model.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return int(state["step"])


def _key(budget: Budget, steps: str) -> dict[str, Any]:
    """The budget fields a denoiser's weights depend on (evaluation settings do not count)."""
    names = ("seed", "vae_steps", "vae_batch", "samples", "batch", "lr", steps)
    return {name: getattr(budget, name) for name in names}


@dataclass
class Latents:
    """The training set, encoded once: VAE posterior means, and which prompt each sample has."""

    latents: Any  # (N, 4, 16, 16), unscaled
    prompt_index: Any  # (N,) index into `prompts`
    prompts: list[str]  # the 90 data prompts, then "" (the unconditional prompt for guidance)
    mean: float
    std: float


def encode_dataset(budget: Budget, vae: Any, work: Path, ui: Console) -> Latents:
    import torch

    ckpt = Checkpoint(
        work, "latents", {"seed": budget.seed, "samples": budget.samples, "vae": budget.vae_steps}, _VERSION
    )
    state = ckpt.load()
    if state is not None:
        ui.spent["latents"] = ckpt.seconds
        return Latents(**state["data"])
    prompts = [shapes.make_prompt(*combo) for combo in shapes.combinations()] + [""]
    lookup = {prompt: index for index, prompt in enumerate(prompts)}
    chunk, parts, indices = 250, [], []
    with ui.progress() as bar, torch.no_grad():
        task = bar.add_task("encode", total=budget.samples, info="")
        for start in range(0, budget.samples, chunk):
            count = min(chunk, budget.samples - start)
            images, texts = shapes.make_batch(_rng(budget, "latents", start), count)
            parts.append(vae.encode(_to_pixels(images)).latent_dist.mean)
            indices += [lookup[text] for text in texts]
            bar.update(task, advance=count)
    latents = torch.cat(parts)
    data = Latents(latents, torch.tensor(indices), prompts, float(latents.mean()), float(latents.std()))
    ckpt.save(data=asdict(data))
    ui.spent["latents"] = ckpt.seconds
    return data


def _token_ids(tokenizer: Any, prompts: list[str]) -> Any:
    """Token ids exactly as the pipelines tokenize: padded to the tokenizer's maximum length."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _batch(budget: Budget, data: Latents, phase: str, step: int) -> tuple[Any, Any, Any]:
    """Sample indices, prompt indices (10% replaced by the empty prompt) and the step's generator."""
    import torch

    gen = _generator(budget, phase, step)
    index = torch.randint(len(data.latents), (budget.batch,), generator=gen)
    prompt = data.prompt_index[index].clone()
    prompt[torch.rand(budget.batch, generator=gen) < 0.1] = len(data.prompts) - 1
    return index, prompt, gen


def train_unet(budget: Budget, data: Latents, vae: Any, tokenizer: Any, work: Path, ui: Console) -> Any:
    """Epsilon prediction on DDPM linear betas with min-SNR-5 weighting; the text encoder trains jointly."""
    import torch

    torch.manual_seed(budget.seed + 1)
    text_encoder, unet = arch.build_text_encoder(tokenizer), arch.build_unet()
    params = [*text_encoder.parameters(), *unet.parameters()]
    optimizer = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.01)
    ema = Ema([text_encoder, unet])
    ckpt = Checkpoint(work, "unet", _key(budget, "unet_steps"), _VERSION)
    start = _resume(ckpt, {"text_encoder": text_encoder, "unet": unet}, optimizer, ema)
    scale = 1.0 / data.std
    alphas = torch.cumprod(1 - torch.linspace(arch.BETA_START, arch.BETA_END, arch.TRAIN_TIMESTEPS), 0)
    ids = _token_ids(tokenizer, data.prompts)
    pipe = arch.assemble_sd(_with_scale(vae, scale, None), ema.models[0], tokenizer, ema.models[1])
    with ui.progress() as bar:
        task = bar.add_task("unet", total=budget.unet_steps, completed=start, info="")
        for step in range(start, budget.unet_steps):
            index, prompt, gen = _batch(budget, data, "unet", step)
            x0 = data.latents[index] * scale
            t = torch.randint(0, arch.TRAIN_TIMESTEPS, (budget.batch,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
            context = text_encoder(ids[prompt])[0]
            predicted = unet(noisy, t, encoder_hidden_states=context).sample
            snr = alphas[t] / (1 - alphas[t])
            weight = snr.clamp(max=5.0) / snr
            loss = (weight * (predicted - noise).pow(2).mean(dim=(1, 2, 3))).mean()
            optimize(optimizer, loss, _lr(budget, step, budget.unet_steps))
            ema.update(step)
            ui.advance(bar, task, f"loss {loss.item():.4f}")
            if due(step, budget.unet_steps, budget.eval_every):
                models = {"text_encoder": text_encoder.state_dict(), "unet": unet.state_dict()}
                ckpt.save(step=step + 1, optimizer=optimizer.state_dict(), ema=ema.state_dict(), **models)
                ui.print(f"unet step {step + 1}: adherence {shapes.format_scores(evaluate(pipe, budget))}")
    ui.spent["unet"] = ckpt.seconds
    return pipe


def _sd3_context(encoders: list[Any], ids: Any, pad: int) -> tuple[Any, Any]:
    """Prompt embeddings as StableDiffusion3Pipeline builds them: penultimate hidden states and pooled."""
    import torch

    outputs = [encoder(ids, output_hidden_states=True) for encoder in encoders]
    tokens = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
    pooled = torch.cat([out[0] for out in outputs], dim=-1)
    zeros = tokens.new_zeros(tokens.shape[0], pad, tokens.shape[-1])
    return torch.cat([tokens, zeros], dim=1), pooled


def train_dit(budget: Budget, data: Latents, vae: Any, tokenizer: Any, work: Path, ui: Console) -> Any:
    """Rectified flow (velocity = noise − data) with logit-normal times, as SD3 is trained."""
    import torch

    torch.manual_seed(budget.seed + 2)
    encoders = [arch.build_projected_text_encoder(tokenizer) for _ in range(2)]
    transformer = arch.build_transformer()
    params = [p for m in (*encoders, transformer) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.01)
    ema = Ema([*encoders, transformer])
    ckpt = Checkpoint(work, "dit", _key(budget, "dit_steps"), _VERSION)
    start = _resume(
        ckpt, {"encoder_1": encoders[0], "encoder_2": encoders[1], "transformer": transformer}, optimizer, ema
    )
    scale, shift = 1.0 / data.std, data.mean
    ids = _token_ids(tokenizer, data.prompts)
    pipe = arch.assemble_sd3(
        _with_scale(vae, scale, shift), ema.models[0], ema.models[1], tokenizer, ema.models[2]
    )
    transformer.set_attn_processor(PadBiasJointAttention())
    with ui.progress() as bar:
        task = bar.add_task("dit", total=budget.dit_steps, completed=start, info="")
        for step in range(start, budget.dit_steps):
            index, prompt, gen = _batch(budget, data, "dit", step)
            x0 = (data.latents[index] - shift) * scale
            sigma = torch.sigmoid(torch.randn(budget.batch, generator=gen)).view(-1, 1, 1, 1)
            noise = torch.randn(x0.shape, generator=gen)
            context, pooled = _sd3_context(encoders, ids[prompt], pad=1)
            predicted = transformer(
                hidden_states=(1 - sigma) * x0 + sigma * noise,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                timestep=sigma.flatten() * arch.TRAIN_TIMESTEPS,
            ).sample
            loss = (predicted - (noise - x0)).pow(2).mean()
            optimize(optimizer, loss, _lr(budget, step, budget.dit_steps))
            ema.update(step)
            ui.advance(bar, task, f"loss {loss.item():.4f}")
            if due(step, budget.dit_steps, budget.eval_every):
                models = {"encoder_1": encoders[0], "encoder_2": encoders[1], "transformer": transformer}
                states = {name: model.state_dict() for name, model in models.items()}
                ckpt.save(step=step + 1, optimizer=optimizer.state_dict(), ema=ema.state_dict(), **states)
                ui.print(f"dit step {step + 1}: adherence {shapes.format_scores(evaluate(pipe, budget))}")
    ui.spent["dit"] = ckpt.seconds
    return pipe


def _with_scale(vae: Any, scale: float, shift: float | None) -> Any:
    """A copy of the VAE whose config carries the latent scaling the denoiser was trained with."""
    copied = copy.deepcopy(vae)
    copied.register_to_config(scaling_factor=scale, shift_factor=shift)
    return copied


# --------------------------------------------------------------------------------------- evaluation
def eval_prompts(count: int) -> list[str]:
    """A fixed spread of the 90 combinations (every 5th one covers all colours, shapes and backgrounds)."""
    combos = shapes.combinations()
    stride = max(1, len(combos) // count)
    return [shapes.make_prompt(*combo) for combo in combos[::stride][:count]]


def generate(
    pipe: Any,
    prompts: list[str],
    steps: int = 20,
    guidance: float | None = None,
    seed: int = 0,
    batch: int = 30,
) -> list[Any]:
    """PIL images, one per prompt, prompt i seeded with seed + i (as dgrun recipes seed them)."""
    import torch

    images: list[Any] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": generators}
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        with torch.no_grad():
            images += pipe(chunk, **kwargs).images
    return images


def evaluate(pipe: Any, budget: Budget, prompts: list[str] | None = None) -> dict[str, float]:
    prompts = prompts or eval_prompts(budget.eval_prompts)
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, prompts, steps=budget.eval_steps)
    return shapes.score(zip(prompts, images, strict=True))


def save(pipe: Any, directory: Path, report: dict[str, Any]) -> None:
    """float16 safetensors (half the size; loading casts back to float32) and a provenance note."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(str(directory), safe_serialization=True)
    (directory / "training.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- main
def provenance() -> dict[str, Any]:
    """What the weights' bits depend on besides the seed: package versions, CPU kernels, thread count.

    Measured: 20 VAE steps give other bits with 1 thread than with 2, and other bits again when torch and
    oneDNN are held to AVX2 on an AVX-512 machine; the OpenMP wait policy changes nothing.
    """
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found: dict[str, Any] = {}
    for name in ("torch", "diffusers", "transformers", "numpy", "pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    found["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    found["threads"] = torch.get_num_threads()
    return found


def parse_steps(text: str, budget: Budget) -> Budget:
    """`vae=1200,unet=4500,dit=6000` → the budget with those step counts."""
    changes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in ("vae", "unet", "dit") or not value.isdigit():
            raise SystemExit(f"--steps: expected NAME=COUNT with NAME vae, unet or dit, got {item!r}")
        changes[f"{name}_steps"] = int(value)
    return replace(budget, **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dgrun.models.train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=arch.WEIGHTS_DIR, help="writes OUT/default and OUT/default-dit"
    )
    parser.add_argument("--work", type=Path, default=Path("outputs/train-default"), help="checkpoints")
    parser.add_argument("--steps", default="", help="e.g. vae=1200,unet=4500,dit=6000")
    parser.add_argument("--which", choices=("unet", "dit", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    budget = parse_steps(args.steps, replace(QUICK if args.quick else Budget(), seed=args.seed))
    waiting = choose_wait_policy()
    quiet_libraries()  # float16-cast and absent-T5 warnings, library progress bars
    ui = Console()
    ui.print(f"budget: {json.dumps(asdict(budget))}")
    ui.print(f"OpenMP wait policy: {waiting}")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def phase(name: str, run: Any) -> Any:
        begun = time.perf_counter()
        result = run()
        timings[name] = round(time.perf_counter() - begun, 1)
        ui.print(f"{name}: {timings[name]:.0f} s")
        return result

    tokenizer = arch.build_tokenizer(args.work / "tokenizer")
    vae = phase("vae", lambda: train_vae(budget, args.work, ui))
    data = phase("latents", lambda: encode_dataset(budget, vae, args.work, ui))
    ui.print(f"latents: mean {data.mean:.3f} std {data.std:.3f}")
    final = shapes.combinations() if not args.quick else shapes.combinations()[::45]
    prompts = [shapes.make_prompt(*combo) for combo in final]
    jobs = {"unet": ("default", train_unet), "dit": ("default-dit", train_dit)}
    for which, (name, train) in jobs.items():
        if args.which not in (which, "both"):
            continue
        pipe = phase(which, lambda train=train: train(budget, data, vae, tokenizer, args.work, ui))
        scores = evaluate(pipe, budget, prompts)
        ui.print(f"{name}: adherence on {len(prompts)} prompts: {shapes.format_scores(scores)}")
        steps = {"vae": budget.vae_steps, which: getattr(budget, f"{which}_steps")}
        # Training seconds per phase, summed over resumed runs (the wall clock of a shared machine).
        spent = {phase: round(ui.spent[phase], 1) for phase in ("vae", "latents", which)}
        report = {
            "budget": asdict(budget),
            "steps": steps,
            "train_seconds": spent,
            "adherence": scores,
            "provenance": provenance(),
        }
        save(pipe, args.out / name, report)
        ui.print(f"saved {args.out / name}")
    spent = {phase: round(seconds) for phase, seconds in ui.spent.items()}
    ui.print(f"this run: {time.perf_counter() - started:.0f} s {json.dumps(timings)}")
    ui.print(f"training seconds per phase, all runs: {json.dumps(spent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
