"""The Phi-3-V image embedding: CLIP tower, 2x2 merge, HD stitching with separators, projection.

Module and parameter names follow the official checkpoint (`img_processor.vision_model.*`,
`img_projection.{0,2}`, `glb_GN`, `sub_GN`) so weights load and save without renaming.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig, CLIPVisionModel

from phivision.errors import PhivisionError
from phivision.model.config import Phi3VConfig


class CLIPVisionTower(nn.Module):
    """Holds the CLIP model under the name `vision_model`, as the official checkpoint does."""

    # True (benchmarks only) also runs the last encoder layer and the final norm, whose outputs
    # the features never use, as the official code does; the default skips them.
    run_unused_layers: bool = False

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config)
        self.freeze_unused()

    def unused_modules(self) -> list[nn.Module]:
        """The official features come from the second-to-last layer: these never see a gradient."""
        return [self.vision_model.encoder.layers[-1], self.vision_model.post_layernorm]

    def freeze_unused(self) -> None:
        """They stay in the state dict (load/save) but must not require grad, or DDP fails on them."""
        for module in self.unused_modules():
            module.requires_grad_(False)

    def penultimate_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Hidden states after all but the last encoder layer, class token dropped."""
        clip = self.vision_model
        hidden = clip.embeddings(pixel_values.to(clip.embeddings.patch_embedding.weight.dtype))
        hidden = clip.pre_layrnorm(hidden)
        for layer in clip.encoder.layers[:-1]:
            hidden = layer(hidden, None)
        if self.run_unused_layers:
            clip.post_layernorm(clip.encoder.layers[-1](hidden, None)[:, 0])
        return hidden[:, 1:]

    def learns(self) -> bool:
        return torch.is_grad_enabled() and any(parameter.requires_grad for parameter in self.parameters())

    def recomputes_layers(self) -> bool:
        """Gradient checkpointing is on: each layer keeps only its input and is recomputed in the backward pass."""
        return self.training and all(getattr(layer, "gradient_checkpointing", False)
                                     for layer in self.vision_model.encoder.layers)

    def chunked_features(self, crops: torch.Tensor, crops_per_chunk: int | None) -> torch.Tensor:
        """`penultimate_features` over at most `crops_per_chunk` crops at a time.

        Training keeps every crop's CLIP activations until the backward pass (about 1.1 GiB per
        336-px crop in fp32), so a micro-batch of many images needs memory for all of them. Here
        every chunk but the last is recomputed in the backward pass instead, and the backward runs
        the chunks last to first, so one chunk's activations are live at a time, at the cost of a
        second forward pass of the earlier chunks. Nothing is recomputed when the crops fit in one
        chunk, when CLIP does not learn, or when gradient checkpointing already recomputes its layers.
        """
        if crops_per_chunk is None or len(crops) <= crops_per_chunk:
            return self.penultimate_features(crops)
        recompute = self.learns() and not self.recomputes_layers()
        chunks = crops.split(crops_per_chunk)
        features = [checkpoint(self.penultimate_features, chunk, use_reentrant=False) if recompute
                    else self.penultimate_features(chunk) for chunk in chunks[:-1]]
        return torch.cat([*features, self.penultimate_features(chunks[-1])])


class Phi3VImageEmbedding(nn.Module):
    # True (benchmarks only) runs CLIP on the zero padding crops too and drops their features
    # afterwards, as the official code does; the default skips them.
    encode_padding_crops: bool = False
    # Crops per CLIP pass (None: all of a micro-batch's crops at once); training sets it from
    # `vision_crops_per_chunk` to bound CLIP's activation memory (see `chunked_features`).
    crops_per_chunk: int | None = None

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.crop_size = config.crop_size
        self.patch_grid = config.patch_grid
        self.merged_grid = config.merged_grid
        self.hd_transform_order = config.embd_layer.get("hd_transform_order", "sub_glb")
        if self.hd_transform_order not in ("sub_glb", "glb_sub"):
            raise PhivisionError(f"unsupported embd_layer.hd_transform_order {self.hd_transform_order!r}")
        merged_dim = config.image_dim_out * 4
        self.img_processor = CLIPVisionTower(config.vision_config())
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged_dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged_dim))
        self.img_projection = nn.Sequential(
            nn.Linear(merged_dim, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )

    def crop_grids(self, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        """(rows, cols) of HD crops per image, from the padded sizes the processor reports."""
        return [(int(h) // self.crop_size, int(w) // self.crop_size) for h, w in image_sizes.tolist()]

    def _merge_2x2(self, features: torch.Tensor) -> torch.Tensor:
        """[n, P*P, C] patch features -> [n, P/2, P/2, 4C], each 2x2 block concatenated row-major."""
        n, _, channels = features.shape
        half = self.merged_grid
        features = features.reshape(n, half, 2, half, 2, channels).permute(0, 1, 3, 2, 4, 5)
        return features.reshape(n, half, half, 4 * channels)

    def _with_row_separators(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, D] -> [rows * (cols + 1), D]: a learned `sub_GN` closes every row."""
        rows = grid.shape[0]
        separator = self.sub_GN.reshape(1, 1, -1).expand(rows, 1, -1)
        return torch.cat([grid, separator.to(grid.dtype)], dim=1).reshape(-1, grid.shape[-1])

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Features of every image, concatenated in image order: [total_image_tokens, hidden].

        `pixel_values` is [num_images, max_crops, 3, S, S] with the global view first; crops
        beyond each image's grid are zero padding and are never run through CLIP.
        """
        grids = self.crop_grids(image_sizes)
        crops_used = [rows * cols + 1 for rows, cols in grids]
        if max(crops_used) > pixel_values.shape[1]:
            raise PhivisionError(
                f"image_sizes ask for {max(crops_used)} crops but pixel_values holds {pixel_values.shape[1]}"
            )
        used = torch.arange(pixel_values.shape[1], device=pixel_values.device)[None, :] < torch.tensor(
            crops_used, device=pixel_values.device
        )[:, None]
        if self.encode_padding_crops:
            every_slot = self.img_processor.chunked_features(pixel_values.flatten(0, 1), self.crops_per_chunk)
            patch_features = every_slot.unflatten(0, pixel_values.shape[:2])[used]
        else:
            patch_features = self.img_processor.chunked_features(pixel_values[used], self.crops_per_chunk)
        merged = self._merge_2x2(patch_features)
        half = self.merged_grid
        per_image = []
        for (rows, cols), image_merged in zip(grids, torch.split(merged, crops_used)):
            global_view = self._with_row_separators(image_merged[0])
            sub = image_merged[1:].reshape(rows, cols, half, half, -1).permute(0, 2, 1, 3, 4)
            sub = self._with_row_separators(sub.reshape(rows * half, cols * half, -1))
            glb_gn = self.glb_GN.reshape(1, -1).to(sub.dtype)
            if self.hd_transform_order == "sub_glb":
                per_image.append(torch.cat([sub, glb_gn, global_view]))
            else:
                per_image.append(torch.cat([global_view, glb_gn, sub]))
        stitched = torch.cat(per_image)
        projection_dtype = self.img_projection[0].weight.dtype
        return self.img_projection(stitched.to(projection_dtype))


def num_image_tokens(rows: int, cols: int, merged_grid: int = 12) -> int:
    """Placeholder tokens for one image with a rows x cols crop grid (2509 for 4x4 at 336 px)."""
    return (rows * cols + 1) * merged_grid * merged_grid + 1 + (rows + 1) * merged_grid
