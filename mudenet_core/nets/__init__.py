"""Networks: one file per network (backbones, PDN teacher/students, autoencoder, MuDeNet assembly)."""
