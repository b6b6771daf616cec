"""The miniature reproduction of the Multimodal-CoT ablation, apart from the library.

``synthetic`` generates ScienceQA-format problems with image features; ``reproduce`` trains the four
ablation rows on them (``python -m mmr_mmcot.miniature.reproduce --out DIR``). The library modules of
``mmr_mmcot`` never import this subpackage; it imports the library like any user would.
"""
