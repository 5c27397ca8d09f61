"""
Configuration classes of EchoX: the composite `EchoXConfig`, the echo decoder's `EchoXEchoDecoderConfig` and the unit
vocoder's `EchoXVocoderConfig`. Decoding-time choices (segmentation, echo-decoder output length) live in the
generation config, `EchoXGenerationConfig`.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlamaConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .generation_configuration_echox import ECHOX_GENERATION_FIELDS


@strict
class EchoXVocoderConfig(PreTrainedConfig):
    r"""
    Configuration of the unit vocoder: a CodeHiFiGAN (unit embedding, duration predictor, HiFi-GAN generator) that turns
    deduplicated speech units into a waveform. The defaults are those of fairseq's mHuBERT layer-11 km1000 LJSpeech
    unit vocoder shipped with the released EchoX.

    Field names follow `SeamlessM4TConfig` so that transformers' HiFi-GAN building blocks read them directly.

    Generator:
        generator_type: `"hifigan"` (default; the released CodeHiFiGAN, fields `upsample_*`, `resblock_*`,
            `leaky_relu_slope`) or `"istft"`, a light Vocos-style generator (`EchoXIstftGenerator`: ConvNeXt blocks →
            magnitude + phase → inverse STFT) that trains to intelligible speech on a CPU without a GAN. The unit
            embedding, duration predictor and speaker embedding are the same for both.
        istft_dim: channels of the ConvNeXt blocks.
        istft_intermediate_dim: hidden width of each block's pointwise MLP.
        istft_layers: number of ConvNeXt blocks.
        istft_upsample: each unit frame is repeated this many times before the blocks. The default 2 runs the
            generator at 100 Hz (hop 160 samples at 16 kHz) rather than at the 50 Hz unit rate: a 10 ms hop with a
            40 ms window is the usual, well-conditioned STFT for speech (and what the CPU feasibility run used), while
            a 20 ms hop would need an 80 ms window whose single magnitude + phase per bin smears fast transitions.
        istft_n_fft: FFT size = Hann window length of the inverse STFT (`istft_n_fft // 2 + 1` bins); even and
            ≥ 2 × `istft_hop_length`.
        istft_hop_length: samples per generator frame. Samples per unit frame (`hop_length`) =
            `istft_upsample × istft_hop_length` (320 at 16 kHz, 50 Hz units, with the defaults).
    """

    model_type = "echox_vocoder"

    num_units: int = 1000
    unit_embed_dim: int = 128
    num_speakers: int = 0
    spkr_embed_dim: int = 0
    upsample_initial_channel: int = 512
    upsample_rates: list[int] | tuple[int, ...] = (5, 4, 4, 2, 2)
    upsample_kernel_sizes: list[int] | tuple[int, ...] = (11, 8, 8, 4, 4)
    resblock_kernel_sizes: list[int] | tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: list | tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    leaky_relu_slope: float = 0.1
    variance_predictor_kernel_size: int = 3
    var_pred_dropout: float = 0.5
    sampling_rate: int = 16000
    initializer_range: float = 0.01
    generator_type: Literal["hifigan", "istft"] = "hifigan"
    istft_dim: int = 256
    istft_intermediate_dim: int = 768
    istft_layers: int = 6
    istft_upsample: int = 2
    istft_n_fft: int = 640
    istft_hop_length: int = 160

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.generator_type not in ("hifigan", "istft"):
            raise ValueError(
                f"EchoXVocoderConfig: generator_type must be 'hifigan' or 'istft', got {self.generator_type!r}."
            )
        if min(self.istft_dim, self.istft_intermediate_dim, self.istft_layers, self.istft_upsample) < 1:
            raise ValueError(
                "EchoXVocoderConfig: istft_dim, istft_intermediate_dim, istft_layers and istft_upsample must be ≥ 1."
            )
        if self.istft_hop_length < 1 or self.istft_n_fft % 2 or self.istft_n_fft < 2 * self.istft_hop_length:
            raise ValueError("EchoXVocoderConfig: istft_n_fft must be even and ≥ 2 × istft_hop_length ≥ 2.")
        if self.num_speakers == 0 and self.spkr_embed_dim != 0:
            raise ValueError("EchoXVocoderConfig: spkr_embed_dim must be 0 when num_speakers is 0.")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("EchoXVocoderConfig: upsample_rates and upsample_kernel_sizes must have the same length.")

    @property
    def lang_embed_dim(self) -> int:
        """EchoX's vocoder has no language embedding (read by transformers' `SeamlessM4THifiGan`)."""
        return 0

    @property
    def hop_length(self) -> int:
        """Waveform samples produced per (duration-expanded) unit frame."""
        if self.generator_type == "istft":
            return self.istft_upsample * self.istft_hop_length
        hop = 1
        for rate in self.upsample_rates:
            hop *= rate
        return hop


# Token ids of the released (Llama-3 based) EchoX.
_LLAMA3_SPEAKER_HEADER = [128006, 128000, 65576, 128007, 128000, 198]  # <|start_header_id|> BOS "speaker" <|end_header_id|> BOS "\n"
_LLAMA3_EOT = 128009
# What may replace the `<audio>` placeholder (`EchoXConfig.adapter_output`).
ADAPTER_OUTPUTS = ("look_back", "dictation")


@strict
class EchoXEchoDecoderConfig(LlamaConfig):
    r"""
    Configuration of the echo decoder: a small Llama decoder (the [`LlamaConfig`] fields; the defaults are the released
    EchoX's, 8 layers, 768 wide, 12 heads) that reads the LLM's hidden states of a text segment and writes its
    unit-language tokens, and its denoising adapter.

    Reading a segment:
        prefix_ids / suffix_ids: text ids embedded before / after each segment's hidden states (`None`: the released
            Llama-3 speaker header; eot + speaker header).
        prefix_quirk_id: original quirk. At inference the released model appends id 12800 (a typo of 128000 in its
            training code) to the prefix of every segment; `None` disables it.
        spelling_length: `0` (released): each segment token is one input position. `N > 0`: each token is spelled out,
            one position per byte of its lowercase text (at most `N` bytes), holding the token's vector plus a learned
            byte embedding (needs training with it, and the tokenizer's spelling table:
            `model.echo_decoder.set_token_spelling(tokenizer)`).
        denoiser_intermediate_size: hidden width of the denoising adapter (`None` → the LLM's intermediate size).

    Writing units:
        decoder_type: `"autoregressive"` (released): the decoder writes unit tokens one by one after the segment.
            `"ctc"`: it reads the segment once, with attention both ways, each input position repeated `ctc_upsample`
            times, and every position gives a unit token or the blank (the eos row of the units-only head); repeats are
            merged and blanks dropped (CTC). The alignment is monotonic by construction, and one forward pass voices a
            segment (needs `units_only_head`, and training with it).
        ctc_upsample: positions per input position of the CTC decoder (its output can be at most this many times as
            long as its input).
        units_only_head: `False` (released): the output layer spans the whole joint vocabulary (LLM text ids + unit
            tokens), although it only ever emits unit tokens and the eos. `True`: it spans just those
            (`unit_vocab_size + 1` rows), ~50× cheaper for a small LLM vocabulary (needs training with it).
        unit_eos_token_id: the joint-vocabulary id that ends an echo-decoder run and every unit target (released:
            128009 = `<|eot_id|>`).

    `vocab_size` is 1 and the Llama's own special token ids are unset: the decoder embeds through the LLM's output
    table and its own unit table, not a token table.
    """

    model_type = "echox_echo_decoder"

    vocab_size: int = 1
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 8
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 12
    head_dim: int | None = 64
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    prefix_ids: list[int] | None = None
    suffix_ids: list[int] | None = None
    prefix_quirk_id: int | None = 12800
    spelling_length: int = 0
    denoiser_intermediate_size: int | None = None
    decoder_type: Literal["autoregressive", "ctc"] = "autoregressive"
    ctc_upsample: int = 3
    units_only_head: bool = False
    unit_eos_token_id: int = _LLAMA3_EOT

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.prefix_ids is None:
            self.prefix_ids = list(_LLAMA3_SPEAKER_HEADER)
        if self.suffix_ids is None:
            self.suffix_ids = [_LLAMA3_EOT, *_LLAMA3_SPEAKER_HEADER]
        if self.spelling_length < 0:
            raise ValueError(f"EchoXEchoDecoderConfig: spelling_length must be >= 0, got {self.spelling_length}.")
        if self.decoder_type not in ("autoregressive", "ctc"):
            raise ValueError(
                f"EchoXEchoDecoderConfig: decoder_type must be 'autoregressive' or 'ctc', got {self.decoder_type!r}."
            )
        if self.decoder_type == "ctc" and not self.units_only_head:
            raise ValueError("EchoXEchoDecoderConfig: decoder_type='ctc' needs units_only_head=True (its eos row is the blank).")
        if self.ctc_upsample < 1:
            raise ValueError(f"EchoXEchoDecoderConfig: ctc_upsample must be >= 1, got {self.ctc_upsample}.")

    def validate_token_ids(self):
        """The echo decoder's ids are joint-vocabulary ids (LLM text, then units), not ids of its 1-row token table;
        `EchoXConfig` checks them against the joint vocabulary."""


# Fields of the first `config.json` layout: echo-decoder fields at the top level, renamed in `EchoXEchoDecoderConfig`.
_TOP_LEVEL_ECHO_FIELDS = {
    "echo_intermediate_size": "denoiser_intermediate_size",
    "echo_prefix_ids": "prefix_ids",
    "echo_suffix_ids": "suffix_ids",
    "echo_prefix_quirk_id": "prefix_quirk_id",
    "echo_units_only_head": "units_only_head",
    "echo_spelling_length": "spelling_length",
    "echo_decoder_type": "decoder_type",
    "echo_ctc_upsample": "ctc_upsample",
    "echo_eos_token_id": "unit_eos_token_id",
}
# ... and fields it had that nothing read (the processor owns the input length; the vocoder, the output rate).
_UNREAD_FIELDS = ("sampling_rate", "max_audio_seconds")


@strict
class EchoXConfig(PreTrainedConfig):
    r"""
    Configuration of [`EchoXForSpeechToSpeech`]: speech encoder → speech adapter → LLM → echo decoder → unit vocoder.
    Decoding-time choices (where the answer is cut into spoken segments, the echo decoder's output length) are in the
    model's generation config, [`EchoXGenerationConfig`].

    Sub-configs:
        audio_config: a `WhisperConfig`; only its encoder part is used.
        text_config: the LLM, any causal LM config (`LlamaConfig`, `Qwen2Config`, ...).
        echo_config: the echo decoder, an [`EchoXEchoDecoderConfig`].
        vocoder_config: an [`EchoXVocoderConfig`].

    Speech adapter:
        audio_token_id: id of the single `<audio>` placeholder that the speech embeddings replace (released: 128256).
        adapter_frame_stack: encoder frames concatenated into one adapter frame (2: 50 Hz → 25 Hz).
        adapter_intermediate_size: FFN width of the adapter's frame block (`None` → 2 × LLM hidden size).
        adapter_num_heads: attention heads of the frame block and look-back attention (`None` → LLM heads).
        adapter_dropout: dropout of the frame block and look-back attention.
        adapter_per_frame_block: original quirk. The released frame block is a `TransformerEncoderLayer` called on a
            `[1, frames, H]` tensor with `batch_first=False`, so each frame only attends to itself. `True` reproduces
            that; `False` lets frames attend to each other (needs retraining).
        ctc_loss_weight: weight of the CTC loss on the adapter's CTC head (blank = `audio_token_id`).
        crop_audio_padding: `False` (released): the adapter sees every encoder frame of the window, padding included.
            `True`: the encoder still runs on the whole window, but each clip's adapter sees only that clip's real
            frames (+ 4, `AUDIO_CROP_MARGIN` in speech_prompt.py), so answers do not depend on the batch and the
            adapter and its CTC head are several times cheaper on short questions (needs training with it: EchoX-mini
            does).
        encoder_window: `"full"` (released): the speech encoder runs on its whole window (`audio_config`'s
            `max_source_positions`), padding included. `"clip"` (needs `crop_audio_padding`): it runs on each clip's
            cropped frames only (several times faster on short questions; the frames then never attend to padding, so
            the adapter must be trained with it: EchoX-mini is). Encoder states stay window-sized, zero after the frames
            that were encoded.
        adapter_output: what replaces the `<audio>` placeholder. `"look_back"` (released): the kept adapter frames
            after the look-back attention, continuous vectors the LLM learns to read (stage I). `"dictation"`: the
            LLM's own input embeddings of the adapter's CTC dictation (argmax ids, runs collapsed, blanks dropped), so
            the LLM reads the question as the text it would be given, and keeps its text behaviour wherever the
            dictation is right (LegoSLM-style CTC interface, arXiv 2505.11352, with hard ids). Hearing errors reach
            the LLM as wrong words. The look-back layers are then unused, and no gradient reaches the adapter through
            the LLM: only its CTC loss trains it (the hearing stage, `training.stages.hearing`).

    Prompt:
        mask_eot_in_prompt: original quirk. The released model uses `<|eot_id|>` as padding and masks every eot of
            the prompt out of attention (positions still count).
        text_pad_token_id: the LLM pad id (released: 128009 = `<|eot_id|>`).

    Units:
        num_units: size of the acoustic unit inventory (k-means K; released 1000); must equal the vocoder's
            `num_units`. Decoded units ≥ K are dropped.
        unit_vocab_size: number of unit-language tokens `<|unit_...|>`.
        unit_token_offset: id of the first unit-language token in the echo decoder's vocabulary; ids below it are LLM
            text ids (released: 128257 = LLM vocabulary size).
        unit_max_piece_length: most acoustic units in one unit-language piece (width of the model's unit table).
        unit_pieces_split_units: the unit language can split a unit id across two tokens (the released vocabularies:
            `▁837_8` + `1_194` is `[837, 81, 194]`), so its output can only be read joined, by
            `EchoXProcessor.decode_units`; the model's per-piece unit table cannot, and `generate` then needs
            `processor=` to speak. False for vocabularies whose pieces hold whole units (EchoX-mini's).
        denoise_loss_cap: the denoising loss is scaled down to at most this fraction of the echo CE loss.

    A `config.json` in the first layout (echo-decoder fields `echo_*` at the top level, segmentation fields in the
    model config) loads as the same model: the echo fields move into `echo_config`, and the segmentation fields become
    the defaults of the model's generation config (`EchoXGenerationConfig.from_model_config`).
    """

    model_type = "echox"
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "echo_config": SubConfigSpec(config_class=EchoXEchoDecoderConfig),
        "vocoder_config": SubConfigSpec(config_class=EchoXVocoderConfig),
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    echo_config: dict | PreTrainedConfig | None = None
    vocoder_config: dict | PreTrainedConfig | None = None

    audio_token_id: int = 128256
    adapter_frame_stack: int = 2
    adapter_intermediate_size: int | None = None
    adapter_num_heads: int | None = None
    adapter_dropout: float = 0.1
    adapter_per_frame_block: bool = True
    ctc_loss_weight: float = 0.3
    crop_audio_padding: bool = False
    encoder_window: Literal["full", "clip"] = "full"
    adapter_output: Literal[ADAPTER_OUTPUTS] = "look_back"

    mask_eot_in_prompt: bool = True
    text_pad_token_id: int | None = _LLAMA3_EOT

    num_units: int = 1000
    unit_vocab_size: int = 1000
    unit_token_offset: int = 128257
    unit_max_piece_length: int = 1
    unit_pieces_split_units: bool = False
    denoise_loss_cap: float = 0.2

    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self._generation_defaults = {name: kwargs.pop(name) for name in ECHOX_GENERATION_FIELDS if name in kwargs}
        self._move_top_level_echo_fields(kwargs)
        for name in _UNREAD_FIELDS:
            kwargs.pop(name, None)
        super().__post_init__(**kwargs)
        if self.unit_token_offset != self.text_config.vocab_size:
            raise ValueError(
                f"EchoXConfig: unit_token_offset ({self.unit_token_offset}) must equal the LLM vocabulary size "
                f"(text_config.vocab_size = {self.text_config.vocab_size}): unit tokens follow the text ids."
            )
        if self.num_units != self.vocoder_config.num_units:
            raise ValueError(
                f"EchoXConfig: num_units ({self.num_units}) must equal the vocoder's (vocoder_config.num_units = "
                f"{self.vocoder_config.num_units}): the vocoder voices exactly the units the unit table spells."
            )
        echo_ids = {"unit_eos_token_id": [self.echo_config.unit_eos_token_id], "prefix_ids": self.echo_config.prefix_ids,
                    "suffix_ids": self.echo_config.suffix_ids}
        for name, ids in echo_ids.items():
            if any(not 0 <= i < self.echo_vocab_size for i in ids):
                raise ValueError(
                    f"EchoXConfig: echo_config.{name} {ids} holds ids outside the echo decoder's vocabulary "
                    f"(LLM text ids and unit tokens: 0 to {self.echo_vocab_size - 1})."
                )
        if self.encoder_window not in ("full", "clip"):
            raise ValueError(f"EchoXConfig: encoder_window must be 'full' or 'clip', got {self.encoder_window!r}.")
        if self.encoder_window == "clip" and not self.crop_audio_padding:
            raise ValueError("EchoXConfig: encoder_window='clip' needs crop_audio_padding=True (the adapter must crop too).")
        if not 0 <= self.audio_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"EchoXConfig: audio_token_id {self.audio_token_id} is outside the LLM vocabulary "
                f"(text_config.vocab_size = {self.text_config.vocab_size})."
            )
        if self.text_config.hidden_size % self.adapter_heads != 0:
            raise ValueError(
                f"EchoXConfig: the LLM hidden size {self.text_config.hidden_size} is not divisible by "
                f"adapter_num_heads={self.adapter_heads}."
            )

    def _move_top_level_echo_fields(self, kwargs: dict) -> None:
        """
        First layout: `echo_config` was a plain `LlamaConfig` (model type "llama") and the echo decoder's other fields
        were top-level `echo_*` kwargs (their defaults then were the released values, as now).
        """
        moved = {new: kwargs.pop(old) for old, new in _TOP_LEVEL_ECHO_FIELDS.items() if old in kwargs}
        echo = self.echo_config
        if isinstance(echo, PreTrainedConfig) and (moved or not isinstance(echo, EchoXEchoDecoderConfig)):
            echo = echo.to_dict()
        is_llama_dict = isinstance(echo, dict) and echo.get("model_type") == "llama"
        if not moved and not is_llama_dict:
            return
        if is_llama_dict:
            echo = {k: v for k, v in LlamaConfig(**echo).to_dict().items() if k not in ("model_type", "transformers_version")}
        self.echo_config = {**(echo or {}), **moved}

    def to_dict(self):
        output = super().to_dict()
        output.pop("_generation_defaults", None)
        return output

    @property
    def adapter_heads(self) -> int:
        return self.adapter_num_heads or self.text_config.num_attention_heads

    @property
    def adapter_ffn_dim(self) -> int:
        return self.adapter_intermediate_size or 2 * self.text_config.hidden_size

    @property
    def denoiser_dim(self) -> int:
        return self.echo_config.denoiser_intermediate_size or self.text_config.intermediate_size

    @property
    def echo_vocab_size(self) -> int:
        """Size of the echo decoder's output vocabulary: LLM text ids, then the unit-language tokens."""
        return self.unit_token_offset + self.unit_vocab_size


__all__ = ["EchoXConfig", "EchoXEchoDecoderConfig", "EchoXVocoderConfig"]
