"""What a recipe trains and evaluates on: conversations and the one prompt builder, the datasets, where rows
come from (hub datasets, local mirrors, conversation files), images, sampling, collators, the checks of
every sample before training, and synthetic data in the hub schemas.

Builds on ``phi3v.models``; never imports ``phi3v.training``.
"""
