"""mudenet_core: MuDeNet and classic baselines for unsupervised visual anomaly detection.

The package is the importable half of the workbook; the numbered notebooks in ``notebooks/`` call it.

Shape alphabet (used in every docstring and shape comment):
    B: batch size, C: channels, H, W: image size, h, w: feature-map size, S: scales / levels (L in the paper).

Glossary (paper symbol -> code name):
    T -> ``teacher``            pretrained-then-distilled descriptor network (frozen in stage 2)
    S1 -> ``student``          structural student, regresses the teacher's embeddings X^l
    A -> ``autoencoder``       autoencoder reconstructing X^l from a global latent of size Z
    S2 -> ``logical_student``  logical student, regresses the autoencoder's output A^l
    X^l -> ``x`` / ``teacher_maps``       teacher embedding at level l, (B, C, h, w)
    E -> ``target``            distillation target from the pretrained backbone, (B, C, h, w)
    map_st / map_ae            structural (X - S1)^2 and logical (A - S2)^2 anomaly maps, (B, 1, h, w)
    l in {1, 2, 3}             levels with receptive fields 16 / 32 / 64
"""

__version__ = "0.1.0"
