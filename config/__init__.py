"""Shipped defaults (presets, the example LoRA whitelist, the example config), installed as the package
`engine.defaults`: read with importlib.resources when no operator file is set."""
