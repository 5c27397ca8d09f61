"""The EchoX Gradio Space: `app.py` is its entry point; the app is `modeling_echox.demo`."""
