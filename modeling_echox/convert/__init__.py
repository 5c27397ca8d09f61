"""Converters into EchoX checkpoints: the released EchoX checkpoints, fairseq unit vocoders, CTranslate2 Whisper."""
