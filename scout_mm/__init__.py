"""scout_mm: a Llama-4-Scout-family early-fusion vision+text Mixture-of-Experts model."""

from scout_mm.config import ScoutConfig, TextConfig, VisionConfig

__version__ = "0.1.0"

__all__ = [
    "ScoutConfig",
    "TextConfig",
    "VisionConfig",
    "ScoutForConditionalGeneration",
    "Processor",
    "count_parameters",
    "generate",
    "fuse_projections",
    "unfuse_projections",
    "fuse_shared_expert",
    "unfuse_shared_expert",
]


def __getattr__(name):
    # Heavier modules load on first use so ``import scout_mm`` stays cheap.
    if name in ("ScoutForConditionalGeneration", "count_parameters"):
        from scout_mm import model

        return getattr(model, name)
    if name == "generate":
        from scout_mm.generation import generate

        return generate
    if name in ("fuse_projections", "unfuse_projections", "fuse_shared_expert", "unfuse_shared_expert"):
        from scout_mm import fusion

        return getattr(fusion, name)
    if name == "Processor":
        from scout_mm.processor import Processor

        return Processor
    raise AttributeError(f"module 'scout_mm' has no attribute {name!r}")
