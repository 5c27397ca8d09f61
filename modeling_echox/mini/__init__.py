"""EchoX-mini: the committed trained parts (`parts/`), its base weights, and the assembly of the full checkpoint."""
