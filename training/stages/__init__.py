"""
EchoX training stages I (speech-to-text), II (text-to-codec) and III (echo training) on `transformers.Trainer`; I and
III also on TRL's `SFTTrainer` (`trl_trainer.py`).
"""
