"""
Hearing first: train EchoX-mini's speech adapter to dictate — its CTC head, the frozen LLM output table, over the
adapter frames of the frozen Whisper tiny.en encoder — on the listening corpus (`training.data.listening`), with
CTC-only steps that never run the LLM's layers. The output is the adapter state that stage I starts from.

    python -m training.stages.hearing --config training/configs/mini_hearing.json \
        --set train_manifest=build/data/speech/listening.jsonl --set eval_manifest=build/data/speech/listening_heldout.jsonl \
        --set output_dir=build/runs/mini_hearing

Steps (each resumes): (1) the encoder states of every clip are computed once and stored, fp16, cropped to the clip
(`EncoderStateShards`, shards of `SHARD_SIZE` clips named by their content, so a grown corpus only adds shards);
(2) `transformers.Trainer` trains `HearingModel` on them (checkpoints, resume from the newest complete one); every
`eval_steps` the dictation WER on the held-out read sentences is logged; (3) `final/` receives
`hearing_adapter.safetensors` (the trained tensors under their EchoX names, `load_hearing_adapter`) and
`hearing.json` (settings and the dictation WER, next to Whisper tiny.en's own WER on the same clips, whose
transcripts are kept in `<cache_dir>/whisper_tiny_en.jsonl`; the same for `open_eval_manifest` when it is given,
with both scored by kind: `open_set_kinds`).
A run that has reached `max_steps` redoes step (3) (Trainer takes one more step, at the schedule's end, where the
learning rate is about 0): rerun it with an `open_eval_manifest` to score the open set.

Options (config fields): `unfrozen_encoder_layers` k > 0 caches the states before the encoder's last k layers and
trains those layers and the final layer norm too ("partly unfrozen"); `ctc_vocabulary: "corpus"` restricts the CTC
softmax to the tokens the training transcripts hold (+ the blank): cheaper steps, and a dictation that never leaves
the corpus's tokens (evaluated both ways: `restricted` and the full-table argmax the model uses at inference);
`ctc_head: "trained"` trains the CTC head too, from the LLM's output table (`ctc_head_rank` r: as the frozen table +
a trained rank-r correction, which EchoX-mini's parts store as exact low-rank factors); the exported head has zero
rows outside the corpus's tokens. `adapter` sets the frame block's FFN width and heads (a larger adapter).
"""

import json
import math
import os
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .common import (
    last_complete_checkpoint,
    load_config,
    parse_args,
    training_arguments,
)
from .run_log import JsonlLogCallback, log_event, plot_losses

DEFAULTS = {
    "eval_manifest": None,  # held-out read sentences in reserved voices (training.data.listening)
    "open_eval_manifest": None,  # also scored at the end: the open evaluation set (training.data.open_questions)
    "cache_dir": None,  # default: <output_dir>/../hearing_cache
    "unfrozen_encoder_layers": 0,
    "ctc_vocabulary": "corpus",  # "corpus" | "full"
    "ctc_sampled_negatives": 0,  # > 0: training softmax over the batch's targets + the blank + this many random tokens
    "ctc_head": "table",  # "table": the frozen LLM output table | "trained": trained, starting from the table
    "ctc_head_rank": None,  # with "trained": the head is the frozen table + a trained rank-r correction
    "adapter": {"intermediate_size": None, "num_heads": None},
    "init_adapter": None,  # a hearing_adapter.safetensors to start from
    "eval_steps": 250,
    "eval_clips": 400,  # held-out clips scored during training (all of them at the end)
    "seed": 0,
}
CTC_HEADS = ("table", "trained")
SHARD_SIZE = 256
HOP_SAMPLES = 320  # 16 kHz samples per Whisper encoder frame
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------------ base parts
def load_base(config: dict):
    """(EchoXConfig with the adapter settings, tokenizer, Whisper tiny.en encoder, its feature extractor, LLM output
    table `[V, H]`) of EchoX-mini's base weights."""
    from modeling_echox.mini.assembly import WINDOW_SECONDS, mini_config
    from modeling_echox.mini.base_weights import load_smollm2, whisper_tiny_en

    llm, tokenizer = load_smollm2()
    encoder, feature_extractor = whisper_tiny_en(window_seconds=WINDOW_SECONDS)
    echox_config = mini_config(llm.config, encoder.config, tokenizer, num_units=2, unit_vocab_size=2,
                               unit_max_piece_length=1)
    echox_config.adapter_intermediate_size = config["adapter"].get("intermediate_size")
    echox_config.adapter_num_heads = config["adapter"].get("num_heads")
    table = llm.get_output_embeddings().weight.detach().clone()
    return echox_config, tokenizer, encoder.eval(), feature_extractor, table


def cropped_frames(samples: int, max_frames: int, stack: int = 2) -> int:
    """Encoder frames EchoX keeps of a clip of `samples` 16 kHz samples (`EchoXForSpeechToSpeech.cropped_frames`)."""
    from modeling_echox.model.speech_prompt import AUDIO_CROP_MARGIN

    real = math.ceil(samples / HOP_SAMPLES)
    return min(-(-(real + AUDIO_CROP_MARGIN) // stack) * stack, max_frames)


def encode_prefix(encoder, features: torch.Tensor, frames: int, layers: int) -> torch.Tensor:
    """`WhisperEncoder` over the first `frames` encoder frames of one clip's features `[1, mels, T]`, through its first
    `layers` layers (all of them: with the final layer norm, as EchoX's clip window computes it). → `[frames, D]`."""
    hidden = nn.functional.gelu(encoder.conv1(features[:, :, : 2 * frames]))
    hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
    for layer in encoder.layers[:layers]:
        hidden = layer(hidden, None)
    if layers == len(encoder.layers):
        hidden = encoder.layer_norm(hidden)
    return hidden[0]


# ------------------------------------------------------------------------------------------------ encoder states
class EncoderStateShards:
    """
    The frozen encoder's states of every clip of a manifest, fp16, cropped to the clip: shards of `SHARD_SIZE`
    consecutive clips, `<dir>/<key>/<manifest name>-<index>-<hash of the paths>.safetensors` holding `states`
    `[frames of all clips, D]` and `lengths`. `key` hashes the encoder weights and the layer, so other weights never
    reuse them. Building skips shards that exist (resume; a grown manifest adds shards).
    """

    def __init__(self, directory: str, encoder, feature_extractor, layers: int):
        from .data import module_fingerprint

        self.encoder, self.feature_extractor, self.layers = encoder, feature_extractor, layers
        self.directory = os.path.join(directory, f"{module_fingerprint(encoder)}-layers{layers}")
        os.makedirs(self.directory, exist_ok=True)
        self._open: dict = {}

    def shard_paths(self, audio: list[str], name: str) -> list[str]:
        import hashlib

        paths = []
        for start in range(0, len(audio), SHARD_SIZE):
            digest = hashlib.sha1("|".join(audio[start : start + SHARD_SIZE]).encode()).hexdigest()[:10]
            paths.append(os.path.join(self.directory, f"{name}-{start // SHARD_SIZE:05d}-{digest}.safetensors"))
        return paths

    @torch.no_grad()
    def build(self, audio: list[str], name: str, verbose: bool = True) -> list[tuple[str, int, int, int]]:
        """Compute the missing shards; returns (shard, row, offset, frames) for each clip, in order."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        from modeling_echox.model.audio_io import load_audio

        index, started = [], time.perf_counter()
        max_frames = self.encoder.config.max_source_positions
        for number, path in enumerate(self.shard_paths(audio, name)):
            clips = audio[number * SHARD_SIZE : (number + 1) * SHARD_SIZE]
            if not os.path.isfile(path):
                states = []
                for clip in clips:
                    wave = load_audio(clip, target_rate=16000, max_seconds=2 * max_frames * 160 / 16000)
                    features = self.feature_extractor(wave, sampling_rate=16000, padding="max_length",
                                                      return_tensors="pt")["input_features"]
                    frames = cropped_frames(len(wave), max_frames)
                    states.append(encode_prefix(self.encoder, features, frames, self.layers).half())
                lengths = torch.tensor([len(s) for s in states], dtype=torch.long)
                save_file({"states": torch.cat(states).contiguous(), "lengths": lengths}, path + ".tmp")
                os.replace(path + ".tmp", path)
                if verbose:
                    print(f"[hearing] encoded {name} shard {number} ({len(clips)} clips) after "
                          f"{time.perf_counter() - started:.0f} s", flush=True)
            with safe_open(path, "pt") as handle:
                lengths = handle.get_tensor("lengths").tolist()
            offsets = [0] + list(torch.tensor(lengths).cumsum(0).tolist())
            index += [(path, row, offsets[row], lengths[row]) for row in range(len(clips))]
        return index

    def get(self, shard: str, offset: int, frames: int) -> torch.Tensor:
        from safetensors import safe_open

        if shard not in self._open:
            self._open[shard] = safe_open(shard, "pt")
        return self._open[shard].get_slice("states")[offset : offset + frames]


class DictationDataset(torch.utils.data.Dataset):
    """Clips as (cached encoder states, CTC target ids)."""

    def __init__(self, shards: EncoderStateShards, index: list[tuple], labels: list[list[int]], texts: list[str],
                 voices: list[str]):
        self.shards, self.index, self.labels, self.texts, self.voices = shards, index, labels, texts, voices

    def __len__(self):
        return len(self.index)

    def __getitem__(self, item):
        shard, _, offset, frames = self.index[item]
        return {"states": self.shards.get(shard, offset, frames), "labels": self.labels[item]}


def collate(rows: list[dict]) -> dict:
    """Pad states (to an even frame count) and targets; `lengths` = encoder frames of each clip."""
    lengths = torch.tensor([len(row["states"]) for row in rows], dtype=torch.long)
    states = pad_sequence([row["states"] for row in rows], batch_first=True)
    if states.shape[1] % 2:
        states = nn.functional.pad(states, (0, 0, 0, 1))
    labels = pad_sequence([torch.tensor(row["labels"] or [IGNORE_INDEX], dtype=torch.long) for row in rows],
                          batch_first=True, padding_value=IGNORE_INDEX)
    return {"states": states, "lengths": lengths, "labels": labels}


# -------------------------------------------------------------------------------------------------------- model
def ctc_collapse(ids: torch.LongTensor, blank: int) -> list[int]:
    """Greedy CTC decoding of per-frame ids: runs of equal ids collapsed, then blanks dropped."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1:] = ids[1:] != ids[:-1]
    return [i for i in ids[keep].tolist() if i != blank]


class HearingModel(nn.Module):
    """
    The speech adapter's dictation path: [encoder layers that train] → `speech_adapter.encode_frames` (batched, each
    clip attending to its own frames only) → the CTC head (the frozen LLM output table, or its rows `vocab_ids`).
    `forward` returns {"loss": CTC (blank = `<audio>`), "logits"}.
    """

    def __init__(self, echox_config, table: torch.Tensor, encoder=None, unfrozen_layers: int = 0,
                 vocab_ids: torch.Tensor | None = None, sampled_negatives: int = 0, ctc_head: str = "table",
                 ctc_head_rank: int | None = None):
        super().__init__()
        from modeling_echox.model.speech_adapter import EchoXSpeechAdapter

        if ctc_head not in CTC_HEADS:
            raise ValueError(f"ctc_head must be one of {CTC_HEADS}, got {ctc_head!r}.")
        self.speech_adapter = EchoXSpeechAdapter(echox_config)
        if ctc_head_rank is not None and (ctc_head != "trained" or ctc_head_rank < 1):
            raise ValueError(f"ctc_head_rank needs ctc_head='trained' and a rank >= 1, got {ctc_head!r}, {ctc_head_rank}.")
        head = self.speech_adapter.ctc_head.weight
        head.data.copy_(table)
        head.requires_grad_(ctc_head == "trained" and ctc_head_rank is None)
        self.ctc_delta_rows = self.ctc_delta_basis = None
        if ctc_head_rank:
            self.ctc_delta_rows = nn.Parameter(torch.zeros(head.shape[0], ctc_head_rank))
            self.ctc_delta_basis = nn.Parameter(torch.randn(ctc_head_rank, head.shape[1]) * head.std())
        for module in (self.speech_adapter.look_back, self.speech_adapter.look_back_norm):
            module.requires_grad_(False)  # the look-back attention reads the LLM's side: stage I trains it
        self.encoder_layers = nn.ModuleList()
        self.encoder_norm = None
        self.first_unfrozen_layer = len(encoder.layers) - unfrozen_layers if unfrozen_layers else None
        if unfrozen_layers:
            import copy

            self.encoder_layers = nn.ModuleList(copy.deepcopy(encoder.layers[-unfrozen_layers:]))
            self.encoder_norm = copy.deepcopy(encoder.layer_norm)
        self.blank_id = echox_config.audio_token_id
        self.sampled_negatives = sampled_negatives
        self.register_buffer("vocab_ids", vocab_ids if vocab_ids is not None else torch.empty(0, dtype=torch.long))

    def frames(self, states: torch.Tensor, lengths: torch.LongTensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """Encoder states `[N, T, D]` (T even) → adapter frames `[N, T / 2, H]` and their counts."""
        adapter = self.speech_adapter
        states = states.to(adapter.projector.weight.dtype)
        valid = torch.arange(states.shape[1], device=states.device)[None] < lengths[:, None]
        if len(self.encoder_layers):
            mask = torch.zeros(valid.shape, dtype=states.dtype, device=states.device)
            mask = mask.masked_fill(~valid, torch.finfo(states.dtype).min)[:, None, None, :]
            mask = mask.expand(-1, 1, states.shape[1], -1)  # [N, 1, T, T], as `WhisperEncoderLayer` takes it
            for layer in self.encoder_layers:
                states = layer(states, mask)
            states = self.encoder_norm(states)
        num, steps, dim = states.shape
        stack = adapter.frame_stack
        frames = adapter.projector(states.reshape(num, steps // stack, dim * stack))
        counts = (lengths + stack - 1) // stack
        padding = torch.arange(frames.shape[1], device=frames.device)[None] >= counts[:, None]
        frames = adapter.frame_block(frames.transpose(0, 1), src_key_padding_mask=padding).transpose(0, 1)
        return adapter.out_norm(frames), counts

    def sampled_ids(self, labels: torch.LongTensor) -> torch.LongTensor:
        """Sorted token ids of a sampled softmax: the batch's targets, the blank, `sampled_negatives` random tokens
        of the vocabulary (the corpus's, or the whole table)."""
        pool = self.vocab_ids if len(self.vocab_ids) else torch.arange(self.speech_adapter.ctc_head.weight.shape[0])
        negatives = pool[torch.randint(len(pool), (self.sampled_negatives,))]
        targets = labels[labels != IGNORE_INDEX]
        return torch.unique(torch.cat([targets, negatives, torch.tensor([self.blank_id])]))

    def forward(self, states, lengths, labels=None, restricted: bool = True):
        frames, counts = self.frames(states, lengths)
        ids = self.vocab_ids if restricted else self.vocab_ids[:0]
        if self.training and self.sampled_negatives and labels is not None:
            ids = self.sampled_ids(labels)
        logits = self.head_logits(frames, ids)
        loss = None
        if labels is not None:
            valid = labels != IGNORE_INDEX
            targets = labels.masked_fill(~valid, 0)
            blank = self.blank_id
            if len(ids):
                targets = torch.searchsorted(ids, targets)
                blank = int(torch.searchsorted(ids, torch.tensor(self.blank_id)))
            log_probs = nn.functional.log_softmax(logits.float(), dim=-1).transpose(0, 1)
            loss = nn.functional.ctc_loss(log_probs, targets, counts.cpu(), valid.sum(-1).cpu(), blank=blank,
                                          reduction="mean", zero_infinity=True)
        return {"loss": loss, "logits": logits, "counts": counts}

    @property
    def head_trains(self) -> bool:
        """Whether the CTC head is trained (whole, or as a low-rank correction of the table)."""
        return self.ctc_delta_rows is not None or self.speech_adapter.ctc_head.weight.requires_grad

    @torch.no_grad()
    def exported_head(self) -> torch.Tensor:
        """The trained CTC head `[V, H]` as an EchoX model takes it: rows of tokens outside `vocab_ids` (which the
        dictation was never trained to tell apart) are zero, so they never win the argmax over a trained row."""
        head = self.speech_adapter.ctc_head.weight.detach().clone()
        if self.ctc_delta_rows is not None:
            head += self.ctc_delta_rows @ self.ctc_delta_basis
        if len(self.vocab_ids):
            outside = torch.ones(len(head), dtype=torch.bool, device=head.device)
            outside[self.vocab_ids] = False
            head[outside] = 0
        return head

    def head_logits(self, frames: torch.Tensor, ids: torch.LongTensor) -> torch.Tensor:
        """CTC logits of `frames` over the rows `ids` of the head (all rows when `ids` is empty)."""
        weight = self.speech_adapter.ctc_head.weight
        weight = weight[ids] if len(ids) else weight
        if self.ctc_delta_rows is not None:
            rows = self.ctc_delta_rows[ids] if len(ids) else self.ctc_delta_rows
            weight = weight + rows @ self.ctc_delta_basis
        return frames @ weight.T

    @torch.no_grad()
    def dictate(self, states, lengths, restricted: bool = True) -> list[list[int]]:
        """CTC greedy transcripts as LLM token ids (argmax per frame, runs collapsed, blanks dropped). Over the whole
        table the argmax is what an EchoX model with these tensors computes: the exported head's when the head
        trains, else the adapter's own `ctc_argmax`."""
        frames, counts = self.frames(states, lengths)
        if restricted and len(self.vocab_ids):
            ids = self.vocab_ids[self.head_logits(frames, self.vocab_ids).argmax(-1)]
        elif self.head_trains:
            ids = (frames.float() @ self.exported_head().T).argmax(-1)
        else:
            ids = self.speech_adapter.ctc_argmax(frames.float())
        return [ctc_collapse(row[:count], self.blank_id) for row, count in zip(ids, counts.tolist())]

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors under their EchoX checkpoint names (the encoder layers as `audio_tower.layers.*`)."""
        state = {f"speech_adapter.{name}": p.detach().contiguous() for name, p in
                 self.speech_adapter.named_parameters() if p.requires_grad}
        if self.head_trains:
            state["speech_adapter.ctc_head.weight"] = self.exported_head().contiguous()
        if len(self.encoder_layers):
            for index, layer in enumerate(self.encoder_layers, start=self.first_unfrozen_layer):
                for name, p in layer.named_parameters():
                    state[f"audio_tower.layers.{index}.{name}"] = p.detach().contiguous()
            for name, p in self.encoder_norm.named_parameters():
                state[f"audio_tower.layer_norm.{name}"] = p.detach().contiguous()
        return state


def load_hearing_adapter(model, path: str) -> list[str]:
    """Load a `hearing_adapter.safetensors` into an EchoX model (or a `HearingModel`'s EchoX names); ValueError on
    a name or shape the model does not have. Returns the names loaded."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    state = model.state_dict()
    wrong = [n for n, t in tensors.items() if n not in state or state[n].shape != t.shape]
    if wrong:
        raise ValueError(f"{path} does not fit this model: {wrong[:3]} (missing, or another shape).")
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor.to(state[name].dtype))
    return sorted(tensors)


# ---------------------------------------------------------------------------------------------------- dictation
def wer_per_voice(references: list[str], hypotheses: list[str], voices: list[str]) -> dict[str, float]:
    """Corpus WER (normalized texts, 4 decimals) of each voice's (reference, hypothesis) pairs."""
    from modeling_echox.evaluation.text_metrics import word_error_rate

    return {voice: round(word_error_rate([r for r, v in zip(references, voices) if v == voice],
                                         [h for h, v in zip(hypotheses, voices) if v == voice]), 4)
            for voice in sorted(set(voices))}


def dictation_wer(model: HearingModel, dataset: DictationDataset, tokenizer, limit: int | None = None,
                  batch_size: int = 32, bf16: bool = False, keep_transcripts: bool = False) -> dict:
    """WER of the adapter's dictation on `dataset` (both argmax modes), overall and per voice; `bf16`: under bf16
    autocast (the quicker check during training; the final figures are fp32)."""
    from modeling_echox.evaluation.text_metrics import word_error_rate

    rows = range(len(dataset)) if limit is None else range(min(limit, len(dataset)))
    was_training = model.training
    model.eval()
    hypotheses = {"restricted": [], "full": []}
    for start in range(0, len(rows), batch_size):
        batch = collate([dataset[i] for i in rows[start : start + batch_size]])
        for mode in hypotheses:
            if mode == "restricted" and not len(model.vocab_ids):
                continue
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                ids = model.dictate(batch["states"], batch["lengths"], restricted=mode == "restricted")
            hypotheses[mode] += [tokenizer.decode(i) for i in ids]
    model.train(was_training)
    references = [dataset.texts[i] for i in rows]
    voices = [dataset.voices[i] for i in rows]
    result = {"clips": len(references)}
    for mode, texts in hypotheses.items():
        if not texts:
            continue
        result[f"wer_{mode}"] = round(word_error_rate(references, texts), 4)
        result[f"wer_{mode}_per_voice"] = wer_per_voice(references, texts, voices)
        result[f"examples_{mode}"] = [[r, t] for r, t in zip(references[:6], texts[:6])]
    if keep_transcripts:
        result["transcripts"] = hypotheses["full"]
    return result


def open_set_kinds(lines: list[dict], transcripts: list[str]) -> dict:
    """Transcripts of open-set clips scored by kind: WER of the everyday questions, the small talk and the hearing
    probes (every `probe_*` kind), and for the probes the share of transcripts holding every word of the probe's
    unseen name (`probe`)."""
    from modeling_echox.evaluation.text_metrics import all_answer_words_in_text, word_error_rate

    groups: dict[str, list] = {}
    for line, text in zip(lines, transcripts, strict=True):
        kind = line.get("kind", "")
        group = "probe" if kind.startswith("probe") else "small_talk" if kind == "small_talk" else "everyday"
        groups.setdefault(group, []).append((line, text))
    result = {}
    for group, rows in sorted(groups.items()):
        result[group] = {"clips": len(rows), "wer": round(word_error_rate([line["text"] for line, _ in rows],
                                                                           [text for _, text in rows]), 4)}
        if group == "probe":
            heard = [all_answer_words_in_text(line["probe"], text) for line, text in rows]
            result[group]["names_probe"] = round(sum(heard) / len(rows), 4)
    return result


def whisper_wer(manifest_lines: list[dict], out_path: str, keep_transcripts: bool = False) -> dict:
    """Whisper tiny.en (faster-whisper int8, beam 1: `modeling_echox.evaluation.asr`) on the same clips; transcripts cached in
    `out_path`. → {"wer", "wer_per_voice", "clips"}."""
    from modeling_echox.evaluation.text_metrics import word_error_rate
    from modeling_echox.model.audio_io import load_audio

    done = {}
    if os.path.isfile(out_path):
        with open(out_path, encoding="utf-8") as handle:
            done = {row["audio"]: row["whisper"] for row in map(json.loads, handle)}
    todo = [line for line in manifest_lines if line["audio"] not in done]
    if todo:
        from modeling_echox.evaluation.asr import WhisperTranscriber

        asr = WhisperTranscriber(cpu_threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
        with open(out_path, "a", encoding="utf-8") as handle:
            for line in todo:
                done[line["audio"]] = asr(load_audio(line["audio"], target_rate=16000))
                handle.write(json.dumps({"audio": line["audio"], "whisper": done[line["audio"]]}) + "\n")
    references = [line["text"] for line in manifest_lines]
    hypotheses = [done[line["audio"]] for line in manifest_lines]
    voices = [line["voice"] for line in manifest_lines]
    result = {"clips": len(references), "wer": round(word_error_rate(references, hypotheses), 4),
              "wer_per_voice": wer_per_voice(references, hypotheses, voices)}
    if keep_transcripts:
        result["transcripts"] = hypotheses
    return result


# ----------------------------------------------------------------------------------------------------- training
def read_lines(paths) -> list[dict]:
    """Manifest lines of `training.data.listening` (or of the open set, whose `question` is the text) with absolute
    audio paths."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    lines = []
    for path in paths:
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as handle:
            for line in map(json.loads, filter(str.strip, handle)):
                text = line["text"] if "text" in line else line["question"]
                lines.append({**line, "text": text, "audio": os.path.join(base, line["audio"])})
    if not lines:
        raise ValueError(f"The manifests {paths} hold no clips.")
    return lines


def make_dataset(shards: EncoderStateShards, lines: list[dict], name: str, tokenizer, max_ctc_length: int):
    index = shards.build([line["audio"] for line in lines], name)
    labels = [tokenizer(line["text"], add_special_tokens=False).input_ids[:max_ctc_length] for line in lines]
    return DictationDataset(shards, index, labels, [line["text"] for line in lines], [line["voice"] for line in lines])


def main(config: dict) -> dict:
    from transformers import Trainer, TrainerCallback

    if config["ctc_vocabulary"] not in ("corpus", "full"):
        raise ValueError(f"ctc_vocabulary must be 'corpus' or 'full', got {config['ctc_vocabulary']!r}.")
    if not config.get("train_manifest") or not config.get("eval_manifest"):
        raise ValueError("The hearing stage needs a train_manifest and an eval_manifest (training.data.listening).")
    output_dir = config["output_dir"]
    torch.manual_seed(config["seed"])
    echox_config, tokenizer, encoder, feature_extractor, table = load_base(config)
    unfrozen = int(config["unfrozen_encoder_layers"])
    if not 0 <= unfrozen <= len(encoder.layers):
        raise ValueError(f"unfrozen_encoder_layers must be in [0, {len(encoder.layers)}], got {unfrozen}.")
    cache_dir = config.get("cache_dir") or os.path.join(os.path.dirname(os.path.abspath(output_dir)), "hearing_cache")
    shards = EncoderStateShards(cache_dir, encoder, feature_extractor, len(encoder.layers) - unfrozen)
    train_lines, eval_lines = read_lines(config["train_manifest"]), read_lines(config["eval_manifest"])
    max_ctc = config["max_ctc_length"]
    eval_set = make_dataset(shards, eval_lines, "heldout", tokenizer, max_ctc)
    train_set = make_dataset(shards, train_lines, "train", tokenizer, max_ctc)
    vocab_ids = None
    if config["ctc_vocabulary"] == "corpus":
        vocab_ids = torch.tensor(sorted({i for row in train_set.labels for i in row} | {echox_config.audio_token_id}))
    model = HearingModel(echox_config, table, encoder, unfrozen, vocab_ids, int(config["ctc_sampled_negatives"]),
                         config["ctc_head"], config["ctc_head_rank"])
    if config.get("init_adapter"):
        load_hearing_adapter(model, config["init_adapter"])
    log = os.path.join(output_dir, "train_log.jsonl")
    os.makedirs(output_dir, exist_ok=True)

    class Dictation(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % config["eval_steps"] == 0:
                result = dictation_wer(model, eval_set, tokenizer, config["eval_clips"], bf16=args.bf16)
                log_event(output_dir, {"event": "dictation", "step": state.global_step,
                                       **{k: v for k, v in result.items() if not k.startswith("examples")}})
                print(f"[hearing] step {state.global_step}: dictation WER "
                      f"{ {k: v for k, v in result.items() if k.startswith('wer_') and 'voice' not in k} }", flush=True)

    args = training_arguments(config, ["labels"])
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate,
                      callbacks=[JsonlLogCallback(log), Dictation()])
    resume = last_complete_checkpoint(output_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hours = sum(line.get("duration", 0.0) for line in train_lines) / 3600
    log_event(output_dir, {"event": "start", "stage": "hearing", "resume_from": resume, "clips": len(train_set),
                           "hours": round(hours, 2), "trainable": trainable,
                           "ctc_vocabulary": len(vocab_ids) if vocab_ids is not None else len(table)})
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    final = os.path.join(output_dir, "final")
    os.makedirs(final, exist_ok=True)
    from safetensors.torch import save_file

    save_file(model.trained_state(), os.path.join(final, "hearing_adapter.safetensors"))
    whisper_transcripts = os.path.join(cache_dir, "whisper_tiny_en.jsonl")
    dictation = dictation_wer(model, eval_set, tokenizer)
    whisper = whisper_wer(eval_lines, whisper_transcripts)
    open_set = None
    if config.get("open_eval_manifest"):
        open_lines = read_lines(config["open_eval_manifest"])
        open_dictation = dictation_wer(model, make_dataset(shards, open_lines, "open", tokenizer, max_ctc), tokenizer,
                                       keep_transcripts=True)
        open_whisper = whisper_wer(open_lines, whisper_transcripts, keep_transcripts=True)
        open_set = {"dictation": open_dictation, "whisper_tiny_en": open_whisper, "per_kind": {
            "adapter": open_set_kinds(open_lines, open_dictation.pop("transcripts")),
            "whisper_tiny_en": open_set_kinds(open_lines, open_whisper.pop("transcripts"))}}
    summary = {
        "event": "end", "stage": "hearing", "global_step": trainer.state.global_step,
        "train_loss": result.training_loss, "seconds": round(time.time() - started, 1),
        "train_clips": len(train_set), "train_hours": round(hours, 2),
        "train_distinct_words": len({w for line in train_lines for w in line["text"].split()}),
        "ctc_vocabulary": config["ctc_vocabulary"], "ctc_head": config["ctc_head"],
        "ctc_head_rank": config["ctc_head_rank"], "unfrozen_encoder_layers": unfrozen,
        "adapter": config["adapter"], "trainable": trainable, "dictation": dictation, "whisper_tiny_en": whisper,
        "open_set": open_set,
    }
    with open(os.path.join(final, "hearing.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    plot_losses(trainer.state.log_history, os.path.join(output_dir, "loss.png"), "EchoX-mini hearing (CTC)")
    log_event(output_dir, without_examples(summary))
    return summary


def without_examples(summary: dict) -> dict:
    """A summary without the dictation examples (what the log and the console get)."""
    return {key: without_examples(value) if isinstance(value, dict) else value
            for key, value in summary.items() if not key.startswith("examples")}


def cli():
    args = parse_args(__doc__.strip().splitlines()[0])
    config = load_config(args.config, DEFAULTS, args.set)
    print(json.dumps(without_examples(main(config)), indent=2))


__all__ = ["DEFAULTS", "HearingModel", "dictation_wer", "load_hearing_adapter", "main"]

if __name__ == "__main__":
    cli()
