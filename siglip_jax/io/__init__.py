"""Trained models on disk: the training checkpoint in a workdir (checkpoint, Orbax and grain state),
reading a saved config and parameters from it (checkpoint_params), the export formats (params, hf with
hf_state_dict and safetensors_file, big_vision, stablehlo, formats) and loading a model from any of
them (loading). Uses models and data, never training.
"""
