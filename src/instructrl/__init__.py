"""instructrl: the InstructGPT method (SFT, K-wise reward model, PPO/PPO-ptx) end to end."""

__version__ = "0.1.0"
