"""fluxbot: a Discord image studio on one resident, quantized FLUX engine."""

__version__ = "0.1.0"
