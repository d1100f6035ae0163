"""Coverage-guided fuzzing of the protocol parsers (issue 20); see tests/fuzz/README.md.

encoding.py  the input format: directions, segmentation and bytes in one byte string, and its mutator
seeds.py     valid conversations per protocol, under a few segmentations
harness.py   one input through detect(), a Session, and the protocols stage; what counts as failure
worker.py    one protocol's campaign (atheris/libFuzzer, or the unguided fallback)
campaign.py  several protocols, the report, reproduction (``python -m bench fuzz``)
"""
