"""Stages: the only layer that knows run directories, Lightning, devices and configs.

Each module is one stage a user (or `frugalseg run`) calls with a config and gets artefacts in a run
directory: `train` (supervised segmenter: train, evaluate, predict), `semi` (semi-supervised training),
`classify` (tag classifier), `maps` (cam / advcam / prm maps, seed evaluation), `group` (group-wise
co-attention classifier and its maps), `pipeline` (tags to a model, every stage chained and resumable).
`options` holds the machinery fields every stage config shares (`RunOptions`) and the field helper that
carries each option's help text and cache role; `engine` adapts training to Lightning.

Modules here import the algorithm packages (`data`, `models`, `weak`, `semi`, ...), never the other way
round (`tests/test_layers.py` checks it). Nothing is imported here eagerly: `frugalseg --help` stays fast.
"""
