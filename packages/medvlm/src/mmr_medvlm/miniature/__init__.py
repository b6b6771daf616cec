"""The miniature "attributes beat names" reproduction (Qin et al., Table 4 on BCCD), apart from the library.

``synthetic`` generates the scenes (coloured shapes with attribute phrases, blood-smear-like images) as
COCO-format datasets; ``reproduce`` pretrains a tiny GLIP on them and compares prompts
(``python -m mmr_medvlm.miniature.reproduce --out DIR``; ``scripts/reproduce.py --only medvlm`` runs it).
No library module of ``mmr_medvlm`` imports this subpackage (``tests/test_import_graph.py`` checks); it
uses the library as any user would.
"""
