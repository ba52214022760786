"""vlmforge's model library: towers, projector, decoder, losses, chat format, generation,
checkpoints, and the generated image-text world. torch + transformers only: this package never
imports ray or deepspeed, and does no I/O beyond checkpoint directories.
"""

__version__ = "0.1.0"
