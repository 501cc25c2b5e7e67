"""Using a trained model: embedding batches on a mesh in compiled buckets (embedder), loading any saved
model and embedding or scoring images and texts with its own preprocessing (predictor), pair and match
probabilities (scores), blockwise nearest neighbours and ranks (blockwise), a text-to-image search index
and page (search) and serving an exported model without the model code (serving).
"""
