"""EchoX training stages I (speech-to-text), II (text-to-codec) and III (echo training) on `transformers.Trainer`."""
