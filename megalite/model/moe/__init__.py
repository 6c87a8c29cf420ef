"""Mixture of Experts: top-k router with load-balancing / z losses (:mod:`.router`), the
experts of this expert-parallel rank (:mod:`.experts`), token dispatch over the expert group
(:mod:`.dispatcher`) and the layer that ties them (:mod:`.layer`)."""
from .layer import MoELayer
from .router import MoERecorder, TopKRouter

__all__ = ["MoELayer", "MoERecorder", "TopKRouter"]
