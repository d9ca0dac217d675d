"""Training stages, one readable loop each: pretrain, sft, rm, ppo."""
