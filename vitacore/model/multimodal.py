"""The multimodal model: any causal LM composed with a vision tower, projector and audio stack."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from vitacore.model.encoder_sync import dummy_audio_output, dummy_image_output
from vitacore.model.flops import ModuleCost, attention_flops, step_flops
from vitacore.model.generation import generate_answers
from vitacore.model.loss import chunked_head, linear_cross_entropy, logits_cross_entropy, next_token_targets
from vitacore.model.merge import merge_media_embeddings

# Each freeze unit is the set of parameters under these attribute prefixes.
UNIT_PREFIXES = {
    "llm": ("llm.",),
    "vision_tower": ("vision_tower.",),
    "mm_projector": ("mm_projector.",),
    "audio_encoder": ("audio_encoder.",),
    "audio_adapter": ("audio_adapter.",),
    "audio_prompt": ("audio_prompt.",),
    "state_head": ("state_head.",),
}


class VitaModel(nn.Module):
    """A VITA-style model built by composition.

    Args:
        llm: a transformers causal LM.
        vision_tower: produces ``(N, tokens, mm_hidden)`` features, or None.
        mm_projector: maps vision features to the LLM width, or None.
        audio_encoder: encodes fbank features, or None.
        audio_adapter: maps audio encoder states to the LLM width, or None.
        audio_prompt: learnable embeddings put before every audio block (VITA's prompt embeddings).
        state_head: 3-class head on the last hidden state (VITA's user-state predictor), or None.
        model_max_length: longest sequence after media expansion.
        padding_side: side to re-pad merged rows on.
        mm_config: multimodal config fields saved in exports (``mm_projector_type``, ...).
        loss_chunk_size: supervised positions per chunk of the chunked output head + loss (0: the
            LLM's full logits).
    """

    def __init__(
        self,
        llm: nn.Module,
        vision_tower: Optional[nn.Module] = None,
        mm_projector: Optional[nn.Module] = None,
        audio_encoder: Optional[nn.Module] = None,
        audio_adapter: Optional[nn.Module] = None,
        audio_prompt: Optional[nn.Embedding] = None,
        state_head: Optional[nn.Module] = None,
        model_max_length: int = 2048,
        padding_side: str = "right",
        mm_config: Optional[dict] = None,
        loss_chunk_size: int = 1024,
    ):
        super().__init__()
        self.llm = llm
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.audio_encoder = audio_encoder
        self.audio_adapter = audio_adapter
        self.audio_prompt = audio_prompt
        self.state_head = state_head
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.mm_config = dict(mm_config or {})
        self.loss_chunk_size = loss_chunk_size
        # Units whose modules stay in eval mode while training (set by the freeze policy).
        self.eval_units: tuple[str, ...] = ()
        # Set with several ranks (vitacore.model.prepare_for_training): encoders run on a tiny dummy
        # input when a micro-batch has no image (or audio), so every rank enters the same collectives.
        self.run_all_encoders = False
        # Set on GPUs (prepare_for_training): each forward records its training FLOPs (for MFU).
        self.count_flops = False
        self.last_flops = 0.0

    @property
    def config(self):
        """The LLM's config (DeepSpeed and transformers helpers read ``hidden_size`` from it)."""
        return self.llm.config

    def unit_modules(self) -> dict[str, nn.Module]:
        """Freeze units that exist on this model, by name."""
        units = {
            "llm": self.llm,
            "vision_tower": self.vision_tower,
            "mm_projector": self.mm_projector,
            "audio_encoder": self.audio_encoder,
            "audio_adapter": self.audio_adapter,
            "audio_prompt": self.audio_prompt,
            "state_head": self.state_head,
        }
        return {name: module for name, module in units.items() if module is not None}

    def train(self, mode: bool = True) -> "VitaModel":
        super().train(mode)
        # Frozen encoders keep dropout off and norm statistics fixed even while training.
        modules = self.unit_modules()
        for unit in self.eval_units:
            if unit in modules:
                modules[unit].eval()
        return self

    def _grad_enabled_for(self, module: nn.Module) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())

    def encode_images(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Vision tower + projector: one ``(tokens, hidden)`` block per image."""
        with torch.set_grad_enabled(self._grad_enabled_for(self.vision_tower)):
            features = self.vision_tower(images)
        return list(self.mm_projector(features))

    def encode_audio(self, audios: torch.Tensor, audio_lengths: torch.Tensor,
                     audio_token_lengths: torch.Tensor) -> list[torch.Tensor]:
        """Audio encoder + adapter: one ``(tokens, hidden)`` block per clip, cut to its token count."""
        with torch.set_grad_enabled(self._grad_enabled_for(self.audio_encoder)):
            states, out_lengths = self.audio_encoder(audios, audio_lengths)
        # Zero the padding so the adapter's strided conv never mixes it into a shorter clip's tokens.
        valid = torch.arange(states.shape[1], device=states.device)[None, :] < out_lengths[:, None]
        embeds = self.audio_adapter(states * valid[..., None].to(states.dtype))
        blocks = [embeds[i, : int(n)] for i, n in enumerate(audio_token_lengths.tolist())]
        if self.audio_prompt is not None:
            blocks = [torch.cat([self.audio_prompt.weight.to(block.dtype), block]) for block in blocks]
        return blocks

    def encode_media(self, images: Optional[torch.Tensor], audios: Optional[torch.Tensor],
                     audio_lengths: Optional[torch.Tensor], audio_token_lengths: Optional[torch.Tensor],
                     device: torch.device) -> tuple[list, list, Optional[torch.Tensor]]:
        """Image and audio blocks of a batch, and the summed output of any dummy encoder pass (or None).

        Vision first, then audio, on every rank and every micro-batch (real or dummy input): under
        ZeRO-3 each module's parameters are gathered collectively, so all ranks must agree on order.
        With ``run_all_encoders``, an encoder whose media the batch lacks runs once on a dummy input.
        """
        image_blocks = self.encode_images(images) if images is not None and images.shape[0] else []
        unused = None if image_blocks else dummy_image_output(self, device)
        audio_blocks = (self.encode_audio(audios, audio_lengths, audio_token_lengths)
                        if audios is not None and audios.shape[0] else [])
        if not audio_blocks:
            audio_unused = dummy_audio_output(self, device)
            unused = audio_unused if unused is None else (unused if audio_unused is None else unused + audio_unused)
        return image_blocks, audio_blocks, unused

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        audios: Optional[torch.Tensor] = None,
        audio_lengths: Optional[torch.Tensor] = None,
        audio_token_lengths: Optional[torch.Tensor] = None,
        sample_ids: Optional[Sequence[str]] = None,
        num_items_in_batch: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        **_unused,
    ) -> dict:
        """Run the LLM on text with media spliced in; returns the loss and what metrics need.

        The loss is next-token cross-entropy over supervised positions: chunked over the LLM's last
        hidden states (:mod:`vitacore.model.loss`) when ``loss_chunk_size`` > 0 and the LLM's head
        allows it, else over the LLM's full logits (then returned as ``logits``).
        ``num_items_in_batch`` turns the loss into a token sum divided by it (the engine passes the
        supervised-token count of the whole accumulation group over all ranks, scaled so every token
        weighs the same however the batch is split); None gives the per-micro-batch mean.
        ``segment_ids`` marks packed rows (several samples per row, each attending only to itself).

        Returns:
            ``loss``; ``token_losses`` and ``targets`` ``(B, L)``; ``predictions`` in eval mode;
            ``merged_labels`` and ``segment_ids`` (None unless packed) after the merge.
        """
        image_blocks, audio_blocks, unused = self.encode_media(images, audios, audio_lengths, audio_token_lengths,
                                                               input_ids.device)
        merged = merge_media_embeddings(
            input_ids, labels, attention_mask, self.llm.get_input_embeddings(),
            image_blocks, audio_blocks, self.model_max_length, self.padding_side,
            sample_ids if segment_ids is None else None, segment_ids,
        )
        # Packed rows: no 2-D mask, positions restarting per sample; transformers then masks attention
        # block-diagonally (SDPA / eager) or runs flash-attn's variable-length kernel.
        llm_mask = merged.attention_mask if merged.segment_ids is None else None
        targets = next_token_targets(merged.labels, merged.segment_ids)
        head = chunked_head(self.llm) if self.loss_chunk_size > 0 else None
        output = {}
        if head is not None:
            decoder_output = self.llm.get_decoder()(inputs_embeds=merged.inputs_embeds, attention_mask=llm_mask,
                                                    position_ids=merged.position_ids, use_cache=False)
            result = linear_cross_entropy(decoder_output[0], head, targets, num_items_in_batch,
                                          self.loss_chunk_size, want_predictions=not self.training)
        else:
            logits = self.llm(inputs_embeds=merged.inputs_embeds, attention_mask=llm_mask,
                              position_ids=merged.position_ids, use_cache=False)["logits"]
            result = logits_cross_entropy(logits, targets, num_items_in_batch, want_predictions=not self.training)
            output["logits"] = logits
        if self.count_flops:
            self.last_flops = self._training_flops(merged, images, audio_blocks)
        loss = result.loss
        if unused is not None:
            # Zero-weighted, so the dummy passes change nothing but still take part in backward.
            loss = loss + 0.0 * unused
        output.update(loss=loss, token_losses=result.token_losses, targets=targets, merged_labels=merged.labels,
                      segment_ids=merged.segment_ids)
        if result.predictions is not None:
            output["predictions"] = result.predictions
        return output

    def generate(self, input_ids: torch.Tensor, **kwargs) -> list[list[int]]:
        """New token ids per prompt row, media merged as in training (see
        :func:`vitacore.model.generation.generate_answers` for the arguments); greedy by default."""
        return generate_answers(self, input_ids, **kwargs)

    def _training_flops(self, merged, images, audio_blocks) -> float:
        """Forward + backward model FLOPs of this micro-batch, encoders included (no recomputation)."""
        def weights(module, skip_embeddings=True):
            params = [(n, p) for n, p in module.named_parameters() if not (skip_embeddings and "embed" in n)]
            return sum(getattr(p, "ds_numel", p.numel()) for _, p in params), any(p.requires_grad for _, p in params)

        # One pass over each unit's parameters: (weight count, trains).
        stats = {unit: weights(module, skip_embeddings=unit != "vision_tower")
                 for unit, module in self.unit_modules().items()}
        lengths = merged.attention_mask.sum(dim=1).tolist()
        cfg = self.llm.config
        llm_weights, llm_trains = stats["llm"]
        if getattr(cfg, "tie_word_embeddings", False):  # the logits projection reuses the embeddings
            head = self.llm.get_output_embeddings().weight
            llm_weights += getattr(head, "ds_numel", head.numel())
        tower_weights, tower_trains = stats.get("vision_tower", (0, False))
        projector_weights, projector_trains = stats.get("mm_projector", (0, False))
        media_trains = any(stats.get(u, (0, False))[1] for u in
                           ("vision_tower", "mm_projector", "audio_encoder", "audio_adapter", "audio_prompt"))
        num_images = 0 if images is None else images.shape[0]
        per_image = getattr(self.vision_tower, "num_tokens_per_image", 0)  # what the projector sees
        # The encoder runs on more tokens than it outputs: a CLS token, and InternViT's 4 patches per token.
        encoder_per_image = getattr(self.vision_tower, "encoder_tokens_per_image", per_image)
        tower_cfg = getattr(getattr(self.vision_tower, "encoder", None), "config", None)
        tower_attention = 0.0
        if tower_cfg is not None and num_images:
            tower_attention = attention_flops(tower_cfg.num_hidden_layers, tower_cfg.hidden_size,
                                              [encoder_per_image] * num_images)
        costs = [
            ModuleCost(llm_weights, int(sum(lengths)), llm_trains, media_trains,
                       attention_flops=attention_flops(cfg.num_hidden_layers, cfg.hidden_size, lengths)),
            ModuleCost(projector_weights, num_images * per_image, projector_trains),
            ModuleCost(tower_weights, num_images * encoder_per_image, tower_trains, attention_flops=tower_attention),
        ]
        audio_tokens = sum(block.shape[0] for block in audio_blocks)
        for unit in ("audio_encoder", "audio_adapter"):
            count, trains = stats.get(unit, (0, False))
            costs.append(ModuleCost(count, audio_tokens, trains))
        return step_flops(costs)
