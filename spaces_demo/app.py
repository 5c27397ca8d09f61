"""
The EchoX Gradio Space's entry point. The app itself is `modeling_echox.demo` (installed with the `echox` package);
run it here as `python spaces_demo/app.py --model DIR`, or as `echox demo --model DIR`.
"""

from modeling_echox.demo import build_demo, main

__all__ = ["build_demo", "main"]

if __name__ == "__main__":
    main()
