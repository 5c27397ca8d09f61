"""The EchoX Gradio Space (`app.py`); importable from the repository root as `spaces_demo.app`."""
