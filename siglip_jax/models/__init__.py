"""The SigLIP towers as flax modules: the ViT and NaFlex image towers, the text tower, their shared
layers, the two-tower model with its temperature and bias (two_towers), named sizes, parameter layouts
(scanned or unrolled) and the FLOP count. Uses data only for the image input's options.
"""
