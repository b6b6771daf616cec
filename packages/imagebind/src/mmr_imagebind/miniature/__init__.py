"""The miniature reproduction of emergent zero-shot audio classification (not part of the library).

``data``: real photos and recordings (or your own folder or shards), augmented; ``reproduce``: the run, its
report and plot (``python -m mmr_imagebind.miniature.reproduce --out DIR``). The library modules of
``mmr_imagebind`` never import this subpackage.
"""
