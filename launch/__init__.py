"""Job launchers: ``python -m launch [train] overrides...`` runs torchrun on this machine
(``launcher=local``) or submits an sbatch script (``launcher=slurm``, see ``slurm.py``) after a
config pre-flight check; ``demo`` is the README's main job; ``status|cancel|logs RUN_DIR`` follow
a submitted run. See ``launch/__main__.py``."""
