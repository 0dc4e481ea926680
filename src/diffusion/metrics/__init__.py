"""Sample-quality metrics: feature extractors and FID/KID/IS/precision-recall from one pass over each image."""

from diffusion.metrics.features import (
    DigitsFeatures,
    FeatureExtractor,
    InceptionFeatures,
    ModuleFeatures,
    make_feature_extractor,
)
from diffusion.metrics.quality import SampleQuality, describe, make_protocol, protocol_id

__all__ = ["DigitsFeatures", "FeatureExtractor", "InceptionFeatures", "ModuleFeatures", "SampleQuality",
           "describe", "make_feature_extractor", "make_protocol", "protocol_id"]
