"""sdxl-ckpt: move SDXL weights between diffusers, SD single-file and MindSpore ckpt, and prove them equal."""

__version__ = "0.1.0"
