"""Data: VITA JSON records, registry, templates, media, tokenization, collation, samplers, bad samples."""

from vitacore.data.audio import AudioTransform
from vitacore.data.bad_samples import BadSampleLog
from vitacore.data.build import BundledFiles, DataBundle, DataSpec, ModelInputs, audio_transform_for, build_data
from vitacore.data.conversation import ChatTemplate, get_template, tokenize_conversation
from vitacore.data.dataset import Collator, Sample, VitaJsonDataset, load_records
from vitacore.data.images import ImageSpec, ImageTransform
from vitacore.data.kaldi_fbank import FbankSettings, KaldiFbankTransform
from vitacore.data.prompts import PromptCollator, PromptDataset, PromptSample, question_record, records_dataset
from vitacore.data.registry import DataSource, load_registry, sources_from_config
from vitacore.data.whisper_audio import WhisperAudioTransform

__all__ = [
    "AudioTransform", "BadSampleLog", "BundledFiles", "ChatTemplate", "Collator", "DataBundle", "DataSource",
    "DataSpec", "FbankSettings", "ImageSpec", "ImageTransform", "KaldiFbankTransform", "ModelInputs", "PromptCollator",
    "PromptDataset", "PromptSample", "Sample", "VitaJsonDataset", "WhisperAudioTransform",
    "audio_transform_for", "build_data", "get_template", "load_records", "load_registry", "question_record",
    "records_dataset", "sources_from_config", "tokenize_conversation",
]
