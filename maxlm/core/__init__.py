"""The bottom layer: errors, the config schema, sharding rules, output directories and host tuning.

Imports nothing else of maxlm."""
