"""Examples and experiments built on lightning_merge; nothing in the core imports this subpackage.

* :mod:`~lightning_merge.examples.demo`: the real-data demo (``make demo``, or
  ``python -m lightning_merge.examples.demo``): real experts of all-MiniLM-L6-v2 on four real text tasks,
  merged, searched and fine-tuned in Lightning runs;
* :mod:`~lightning_merge.examples.corpora`: the demo's text tasks, read from packages that install
  offline (no model hub);
* :mod:`~lightning_merge.examples.workflow`: the steps of a text-task merge experiment (probe heads,
  experts, evaluation), shared by the demo and the quality benchmark;
* :mod:`~lightning_merge.examples.encoder`: the encoder task wrapper (``EncoderClassifier``: a shared
  Hugging Face encoder with one frozen linear head per task; ``TaskLogits`` for ``LearnedMerge``);
* :mod:`~lightning_merge.examples.make_recipe_models`: the recipe model maker (tiny Llama experts for
  the offline recipes, ``python -m lightning_merge.examples.make_recipe_models out/recipes``).

The modules are imported one by one (this file imports none of them), so importing
``lightning_merge.examples`` costs nothing; they depend on the core, never the other way round
(``tests/test_core_imports.py`` checks it).
"""
