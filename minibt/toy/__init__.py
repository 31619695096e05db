"""The toy world: a synthetic world with ground truth and a tiny base model pretrained on its text.

world.py generates entities, their attributes and values, the seed pairs, a noisy unlabelled corpus
and the held-out evaluation sets; base.py trains a tokenizer and a tiny Llama on the world's raw text
(cached); metrics.py scores every stage against the ground truth. The real pipeline runs on it
unchanged, so the whole method can be run and measured on a CPU in minutes.
"""
