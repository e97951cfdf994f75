"""Job launchers: ``python -m launch train|demo`` (torchrun on this machine, after a config
pre-flight check). See ``launch/__main__.py``."""
