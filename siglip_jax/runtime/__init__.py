"""The runtime under everything else: device meshes and sharding rules (sharding), joining the
processes of a multi-host run (distributed), local and bucket paths alike (storage) and the command-line
error rule every entry point follows (cli). It imports nothing of the package but the config schema.
"""
