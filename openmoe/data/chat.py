"""Chat / instruction examples -> documents with loss only on the assistant's tokens.

Segments follow the OpenMoE chat template (openmoe/generation/chat.py), so the concatenated
text equals `tokenizer.apply_chat_template(messages)`; each segment is tokenised on its own so
the mask falls exactly on the assistant turns.
"""

from __future__ import annotations

from .packing import Document


def to_messages(example: dict) -> list[dict]:
    if "messages" in example:
        return list(example["messages"])
    return [{"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["response"]}]


def segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, trained) pieces of the OpenMoE chat format."""
    out = []
    msgs = list(messages)
    if msgs and msgs[0]["role"] == "system":
        out.append((f"<<SYS>>\n{msgs[0]['content']}\n<</SYS>>\n\n", False))
        msgs = msgs[1:]
    for m in msgs:
        if m["role"] == "user":
            out.append((f"<s>[INST] {m['content']} [/INST]", False))
        elif m["role"] == "assistant":
            out.append((f" {m['content']}</s>", True))
        else:
            raise ValueError(f"chat example: unknown role {m['role']!r}")
    return out


def chat_document(example: dict, encode) -> Document:
    ids, mask = [], []
    for text, trained in segments(to_messages(example)):
        piece = encode(text)
        ids += piece
        mask += [trained] * len(piece)
    return Document(ids, mask)
