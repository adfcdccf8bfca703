"""YAML presets shipped as package data (no code)."""

if __name__ != "maxlm.configs":  # a bare `import configs` from the checkout's root
  import maxlm
  maxlm.step_aside(__name__)
