"""Label-word scoring (:func:`answer_logprobs`, :class:`LabelWordLM`): moved to
:mod:`lightning_merge.examples.label_words`; re-exported here for the benchmark's scripts."""

from lightning_merge.examples.label_words import LabelWordLM, answer_logprobs  # noqa: F401
