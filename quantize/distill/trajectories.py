"""The teacher's own sampling trajectories: the states it visits at the Turbo timesteps.

No image data set is needed: the teacher draws from noise with its own schedule (8 steps, guidance 0)
and every state it passes through, with its timestep and caption features, is a training input for a
student. The velocity helper calls a transformer exactly as ``ZImagePipeline`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Trajectories:
    """``states[i]`` is a latent the teacher denoised at ``timesteps[i]`` (the pipeline's ``1 - sigma``)
    for prompt ``prompt_ids[i]``; ``features[p]`` is prompt p's caption features (padding dropped)."""

    states: torch.Tensor  # (N, 16, h, w) fp32
    timesteps: torch.Tensor  # (N,)
    prompt_ids: torch.Tensor  # (N,) long
    features: list[torch.Tensor]
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.states)

    def batch(
        self, index: torch.Tensor, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """States, timesteps and caption features of ``index``, moved to ``device`` (they are kept in
        host memory: the real model's trajectories are tens of GB)."""
        features = [self.features[i].to(device) for i in self.prompt_ids[index].tolist()]
        return self.states[index].to(device), self.timesteps[index].to(device), features


def velocity(transformer: Any, latents: torch.Tensor, timesteps: torch.Tensor, features: list[torch.Tensor]) -> Any:
    """The transformer's raw output as the pipeline computes it (the pipeline negates it to step)."""
    dtype = next(transformer.parameters()).dtype
    out = transformer(list(latents.to(dtype).unsqueeze(2).unbind(0)), timesteps, features, return_dict=False)[0]
    return torch.stack([o.float() for o in out]).squeeze(2)


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str], max_sequence_length: int) -> list[torch.Tensor]:
    """The pipeline's own prompt encoding (a copy of the list: the pipeline templates it in place)."""
    embeds, _ = pipe.encode_prompt(
        prompt=list(prompts), device=pipe._execution_device, do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )  # fmt: skip
    return [e.float().cpu() for e in embeds]


@torch.no_grad()
def sample_trajectories(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    width: int,
    height: int,
    num_inference_steps: int,
    max_sequence_length: int,
    batch: int = 64,
) -> Trajectories:
    """Draw every prompt x seed with the teacher and keep every state it visits (no image decoded)."""
    features = encode_prompts(pipe, prompts, max_sequence_length)
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    pairs = [(p, s) for p in range(len(prompts)) for s in seeds]
    scale = pipe.vae_scale_factor * 2
    shape = (16, 2 * (height // scale), 2 * (width // scale))
    states, steps, ids = [], [], []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for _, s in chunk])
        visited: list[torch.Tensor] = [latents]
        times: list[torch.Tensor] = []

        def on_step(_pipe: Any, _i: int, t: Any, tensors: dict[str, Any], visited: list = visited,
                    times: list = times) -> dict[str, Any]:  # fmt: skip
            visited.append(tensors["latents"].float().cpu())
            times.append(torch.as_tensor(t, dtype=torch.float32).reshape(()))
            return {}

        pipe(
            prompt_embeds=[features[p].to(device, dtype) for p, _ in chunk], latents=latents.to(device),
            height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=0.0, output_type="latent",
            callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"],
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
        for step, t in enumerate(times):
            states.append(visited[step])
            steps.append(((1000 - t.cpu()) / 1000).expand(len(chunk)))
            ids.append(torch.tensor([p for p, _ in chunk]))
    return Trajectories(torch.cat(states), torch.cat(steps), torch.cat(ids), features, list(prompts))
