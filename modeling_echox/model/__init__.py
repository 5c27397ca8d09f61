"""
The EchoX model code: configuration, model, processor, pipeline, streaming and vocoders. A saved checkpoint carries
these files (the class's module and its relative imports) for `trust_remote_code=True`, so they import only each
other, transformers, torch and the audio libraries (numpy, soundfile, scipy).
"""
