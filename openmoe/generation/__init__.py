"""What infer.py needs beyond HF generate: the OpenMoE chat format, prompt encoding, stops."""

from .chat import CHAT_TEMPLATE, STOP_TEXT, clean_output, encode_prompts, ensure_chat_template

__all__ = ["CHAT_TEMPLATE", "STOP_TEXT", "clean_output", "encode_prompts", "ensure_chat_template"]
