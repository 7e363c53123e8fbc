"""Examples -> token ids through the chat template, with the answer positions marked.

A sequence is ``chat(prompt) + answer + end-of-turn``. The answer tokens *and* the
end-of-turn token are the targets: a model has only answered when it also stops, so loss
and exact match both cover the stop token. Greedy decoding reproduces the answer exactly
iff the argmax at every target position is the target token, so exact match is read off
one teacher-forced pass instead of a ``generate`` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class PromptAnswer(Protocol):
    """What encoding reads of an example (a :class:`lorafuse.tasks.Example`)."""

    @property
    def prompt(self) -> str: ...

    @property
    def answer(self) -> str: ...


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; ``ids[prompt_len:]`` are the targets."""

    ids: tuple[int, ...]
    prompt_len: int

    @property
    def n_targets(self) -> int:
        return len(self.ids) - self.prompt_len


@dataclass
class Batch:
    """Right-padded ids plus the flat (row, position) of every target's *predicting* token."""

    input_ids: torch.Tensor  # (B, T)
    lengths: torch.Tensor  # (B,)
    rows: torch.Tensor  # (N,) batch row of each target
    positions: torch.Tensor  # (N,) position whose logits predict the target
    targets: torch.Tensor  # (N,) target token ids
    example_index: torch.Tensor  # (N,) which example in the batch (== rows)


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn (``<|im_end|>`` for ChatML models)."""
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            return tid
    return tokenizer.eos_token_id


def prompt_text(tokenizer, prompt: str) -> str:
    """The chat-formatted prompt up to where the assistant's answer starts.

    An empty system message is given explicitly: SmolLM2's template otherwise inserts a
    long default system prompt that would triple every sequence.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": ""}, {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{prompt}\n"


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False).input_ids


def encode_examples(tokenizer, examples: Sequence[PromptAnswer]) -> list[Encoded]:
    eot = end_of_turn_id(tokenizer)
    out = []
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex.prompt)
        answer = tokenizer(ex.answer, add_special_tokens=False).input_ids + [eot]
        out.append(Encoded(tuple(prompt + answer), len(prompt)))
    return out


def collate(encoded: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-pad a list of sequences; causal attention keeps the pads unseen by real tokens."""
    width = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    rows, positions, targets = [], [], []
    for i, e in enumerate(encoded):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        for p in range(e.prompt_len, len(e.ids)):
            rows.append(i)
            positions.append(p - 1)
            targets.append(e.ids[p])
    rows_t = torch.tensor(rows)
    return Batch(
        input_ids=ids,
        lengths=torch.tensor([len(e.ids) for e in encoded]),
        rows=rows_t,
        positions=torch.tensor(positions),
        targets=torch.tensor(targets),
        example_index=rows_t,
    )
