"""OpenMoE chat format and prompt handling (docs/openmoe-numerics.md, section 6).

Chat prompt: `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n<s>[INST] {query} [/INST]`, where `<s>` is plain
text for the umT5 tokenizer. Later turns follow Llama-2: ` {answer}</s><s>[INST] {query} [/INST]`.
The chat model often spells `</s>` as text instead of emitting eos: generation stops on both.
Every sequence starts with id 0 (pad doubles as BOS): the tokenizers we write add it to plain
text (post-processor) and the template writes it for chats (`bos_token`), see data/spm.py.
"""

from __future__ import annotations

import torch

from ..modeling_openmoe import STOP_TEXT  # noqa: F401  (re-exported: the stop string lives with generate)

CHAT_TEMPLATE = (
    # Literal text lives inside {{ }} so the whitespace control of the tags cannot eat it.
    # The BOS (id 0, `<pad>`) is written by the template, since apply_chat_template tokenizes
    # without the post-processor that adds it to plain text.
    "{%- if bos_token -%}{{ bos_token }}{%- endif -%}"
    "{%- set msgs = messages -%}"
    "{%- if msgs and msgs[0]['role'] == 'system' -%}"
    "{{ '<<SYS>>\\n' + msgs[0]['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{%- set msgs = msgs[1:] -%}"
    "{%- endif -%}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] == 'user' -%}{{ '<s>[INST] ' + m['content'] + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' + m['content'] + '</s>' }}"
    "{%- else -%}{{ raise_exception('unknown role ' + m['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give the tokenizer OpenMoE's chat template unless it already has one."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE


def encode_prompts(tokenizer, texts: list[str], bos_id: int = 0, max_positions: int | None = None,
                   max_new_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Tokenise as `tok(text)` does for our tokenizers (BOS 0, no eos) for any tokenizer: without
    its own specials, then BOS 0 unless the text (a chat template's) already starts with it;
    left-pad into a batch with an explicit attention mask."""
    rows = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or ids[0] != bos_id:
            ids = [bos_id] + ids
        if max_positions is not None and len(ids) + max_new_tokens > max_positions:
            raise ValueError(f"prompt {i} is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it "
                             f"exceeds the model's {max_positions} positions")
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": input_ids, "attention_mask": mask}


def clean_output(text: str) -> str:
    """Cut at the first `</s>` spelled as text, and strip."""
    return text.split(STOP_TEXT, 1)[0].strip()
