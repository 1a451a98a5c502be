"""Integrations with training frameworks: DeepSpeed sequence parallelism, Hugging Face transformers.

Import the submodule you need (``ringflash.integrations.deepspeed``,
``ringflash.integrations.transformers``); neither framework is imported until then.
"""
