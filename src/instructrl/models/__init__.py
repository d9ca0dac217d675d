"""Models: tokenizer training, base causal LM construction, policy / reward / value loading and saving."""
