"""The miniature LLaVA instruction-tuning ablation (paper Table 4), apart from the library.

``scenes`` draws synthetic scenes (1-3 coloured shapes with captions and normalized boxes) and turns them
into instruction data with a rule-based generator, the offline stand-in for the paper's text-only GPT-4;
``reproduce`` trains a tiny LLaVA on them and compares no instruction tuning, conversation only and the
full data (``scripts/reproduce.py --only llava`` runs it). No library module of ``mmr_llava`` imports
this subpackage (``tests/test_import_graph.py`` checks); it uses the library as any user would.
"""
