"""The synthetic search world of the CPU demo.

names (made-up syllable names) → world (entities, passages, questions) → trajectories
(behaviour episodes for the SFT warm start) → tokenizer (word + syllable pieces) → build
(`build_demo`: every file the demo reads, built once and cached).
"""
