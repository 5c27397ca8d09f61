"""Spoken-QA data for EchoX-mini: text QA generation (`spoken_qa`) and speech synthesis (`synthesize`)."""
