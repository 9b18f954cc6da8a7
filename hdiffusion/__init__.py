"""hdiffusion: train and sample diffusion models (HDiT, EDM preconditioning) from JSON configs."""

__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily so that `import hdiffusion` stays cheap and optional backends load only when used.
    if name == "HDiT":
        from .models.hdit import HDiT

        return HDiT
    if name == "DiT":
        from .models.dit import DiT

        return DiT
    if name == "DiffiT":
        from .models.diffit import DiffiT

        return DiffiT
    raise AttributeError(f"module 'hdiffusion' has no attribute {name!r}")


__all__ = ["DiT", "DiffiT", "HDiT", "__version__"]
