"""maxlm: a JAX/Flax training stack for decoder language models.

Owns the public entry points; heavy submodules are imported lazily by their users.
"""

__version__ = "0.1.0"
