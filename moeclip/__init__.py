"""moeclip: turn a pretrained CLIP into a sparse Mixture-of-Experts CLIP (Diversified Multiplet Upcycling)."""
from moeclip.loader import load, load_model_dir, save_model_dir

__version__ = "0.1.0"


def upcycle(*args, **kwargs):
    """See `moeclip.moe.upcycle`: dense CLIP + FFN weight sets -> sparse top-k MoE CLIP."""
    from moeclip.moe import upcycle as _upcycle
    return _upcycle(*args, **kwargs)


__all__ = ["load", "load_model_dir", "save_model_dir", "upcycle", "__version__"]
