"""Random tiny EchoX checkpoints and their tiny tokenizer, for tests and quick experiments."""
