"""Classic methods MuDeNet is compared with, behind the same detector interface (see ``mudenet_core.methods``)."""
