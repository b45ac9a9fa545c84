"""Tiny local checkpoints of the LLM families and of Whisper, with tokenizers shaped like the real ones.

The tokenizers start from vitacore's bundled BPE tokenizer and get the special tokens of each family
(Mistral's ``<s>``/``</s>``/``<unk>``/``[INST]``, Llama 3's headers and ``<|eot_id|>``) with the real
pad / bos / eos / unk roles: Mistral and Llama 3 ship without a pad token.
"""

import numpy as np
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from vitacore.demo.tokenizer import build_tokenizer, save_tokenizer

LLMS = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": 2, "num_experts_per_tok": 1}),
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
}
MISTRAL_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "additional_special_tokens": ["<|im_start|>", "[INST]", "[/INST]"]}
LLAMA3_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "additional_special_tokens": ["<|im_start|>", "<|end_of_text|>", "<|start_header_id|>",
                                                 "<|end_header_id|>"]}
WHISPER_MEL = 16
WHISPER_SECONDS = 2  # the tiny encoder's window: 200 frames (the real one: 30 s, 3000 frames)


def family_tokenizer(family: str):
    """The bundled tokenizer, with ``family``'s special tokens and pad rules (qwen2: unchanged)."""
    tokenizer = build_tokenizer()
    if family in ("mistral", "mixtral"):
        tokenizer.add_special_tokens(MISTRAL_SPECIALS)
        tokenizer.pad_token = None
    elif family == "llama":
        tokenizer.add_special_tokens(LLAMA3_SPECIALS)
        tokenizer.pad_token = None
    return tokenizer


def save_tiny_llm(path, family: str, tokenizer=None, seed: int = 0) -> str:
    """A 1-layer random ``family`` LLM and its tokenizer in ``path``."""
    tokenizer = tokenizer or family_tokenizer(family)
    config_class, model_class, extra = LLMS[family]
    torch.manual_seed(seed)
    config = config_class(vocab_size=len(tokenizer) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          pad_token_id=tokenizer.pad_token_id, **extra)
    model_class(config).save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return str(path)


def save_tiny_whisper(path, seed: int = 0) -> str:
    """A tiny Whisper (encoder + decoder, as checkpoints ship) and its feature extractor in ``path``."""
    torch.manual_seed(seed)
    frames = WHISPER_SECONDS * 100
    config = WhisperConfig(
        num_mel_bins=WHISPER_MEL, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=frames // 2,
        max_target_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
    )
    WhisperForConditionalGeneration(config).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=WHISPER_MEL, chunk_length=WHISPER_SECONDS).save_pretrained(path)
    return str(path)


def tone(seconds: float, freq: float = 440.0, rate: int = 16000) -> np.ndarray:
    """A sine tone with a little noise, in [-1, 1]."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(int(freq)).standard_normal(t.shape)
    return (0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * noise).astype(np.float32)
