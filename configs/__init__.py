"""YAML presets shipped as package data (no code)."""
