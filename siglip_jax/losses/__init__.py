"""The contrastive losses, pure functions of the two towers' embeddings: sigmoid (SigLIP) and softmax
(CLIP), on one device or sharded over a mesh as an all-gather, chunks or a ring of ppermutes
(contrastive), with a custom backward pass for the blockwise variants (blockwise).
"""
