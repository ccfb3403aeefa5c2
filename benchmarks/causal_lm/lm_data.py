"""The benchmark's prompts and their data module: moved to :mod:`lightning_merge.examples.label_words`
(``recipes/llm_lora.yaml`` builds them from YAML); re-exported here for the benchmark's scripts."""

from lightning_merge.examples.label_words import (  # noqa: F401
    LABEL_WORDS,
    PROMPTS,
    PromptDataModule,
    PromptSet,
    collate,
    encode,
    label_token_ids,
    label_words,
)
