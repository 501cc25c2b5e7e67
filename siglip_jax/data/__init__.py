"""Input data, from records to batches: sources (a table of kinds, sources/), decoding and augmenting
images (images, naflex), one record to one model input (preprocess), tokenizers, and the grain pipelines
that batch, shard, stream, mix and resume them (pipeline, streaming, mixture). Uses only the runtime.
"""
