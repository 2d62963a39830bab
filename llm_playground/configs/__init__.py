# Makes the packaged YAML configs importable as `pkg://llm_playground.configs` (Hydra), also after a non-editable install.
