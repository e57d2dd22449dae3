"""Files: checkpoint directories of the PyTorch implementations (:mod:`.files`) and Orbax
training checkpoints (:mod:`.checkpoint`). Import the submodule you need (Orbax is slow to load)."""
