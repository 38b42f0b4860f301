"""Classic methods MuDeNet is compared with, behind the detector interface of ``mudenet_core.methods``."""
