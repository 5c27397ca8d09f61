"""Spoken-QA evaluation: the harness, its text metrics, the ASR of spoken answers and the `evaluate` metric."""
