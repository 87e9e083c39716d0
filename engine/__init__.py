"""The image engine: one resident FLUX pipeline behind a small typed API. Never imports bot/ or Discord.

Importing `engine` loads nothing heavy: the data modules (spec, presets, catalog, resolve, whitelist,
settings, api) are torch-free, so a bot that only talks to engine workers never imports torch. The
engine itself is `engine.engine.FluxEngine`.
"""
