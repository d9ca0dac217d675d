"""Speed machinery: the same math as the plain code, computed faster. Nothing here changes what PPO computes.

It reaches the PPO loop at two seams, both chosen once when the models are built (``stages/ppo_build.py``):

* **How log-probs are computed** (``fused_kernels``): :class:`head.FusedHeadLogProbs` applies the LM head fused
  with the log-softmax over vocabulary blocks, where the reference
  :class:`instructrl.models.logprobs.FullLogits` forms the full logits first.
* **How the policy's and the value model's independent work runs** (``overlap_models``): one after the
  other, or at once on two CPU threads (:mod:`overlap`).

Besides: faster kernels swapped into loaded models (:mod:`kernels`) and our KV-cache sampler (:mod:`sampler`),
which gets its runner when it is built. Every piece is tested against the plain computation it replaces.
"""
