"""Which prompt tokens carry which subject: FastComposer's `word <|image|>` syntax and a friendlier one.

How a marker becomes a token position, in one place:
1. `mark_subject_words` (friendly syntax) rewrites "a man and a woman" + words ["man", "woman"] into the
   reference syntax "a man <|image|> and a woman <|image|>".
2. `prompt_with_sentinels` swaps every `<|image|>` for the CLIP end-of-text string. ComfyUI's tokenizer
   turns that string into the end token with the word id of the text around it, while its own start, end
   and padding tokens always have word id 0, so a sentinel can never be confused with them.
3. `remove_sentinels` deletes each sentinel from the tokenized chunks (re-padding each 77-token chunk) and
   marks the token right before it, as the reference code does; positions count across chunks, so a
   subject in the second 77-token chunk of a long prompt is found too.
"""
import re
from dataclasses import dataclass

SUBJECT_MARKER = "<|image|>"
SENTINEL_TEXT = "<|endoftext|>"

Token = tuple  # (token id, weight, word id) as ComfyUI's tokenizer returns with return_word_ids=True


@dataclass(frozen=True)
class MarkedTokens:
    chunks: list[list[Token]]     # the token chunks with every marker removed
    subject_positions: list[int]  # for subject i, its token's index in the concatenated chunks


def split_subject_words(words: str) -> list[str]:
    """"man, old woman" -> ["man", "old woman"]."""
    return [word.strip() for word in words.split(",") if word.strip()]


def mark_subject_words(prompt: str, subject_words: list[str]) -> str:
    """Insert a marker after the first not-yet-used whole-word occurrence of each subject word, in order."""
    if SUBJECT_MARKER in prompt:
        raise ValueError(f"the prompt already contains {SUBJECT_MARKER} markers; use either markers or subject_words, not both")
    taken: list[tuple[int, int]] = []
    for word in subject_words:
        pattern = re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", re.IGNORECASE)
        match = next((m for m in pattern.finditer(prompt) if (m.start(), m.end()) not in taken), None)
        if match is None:
            raise ValueError(f"subject word '{word}' is not in the prompt (or occurs fewer times than it is listed); "
                             f"write it into the prompt or fix subject_words")
        taken.append((match.start(), match.end()))
    for _, end in sorted(taken, reverse=True):
        prompt = prompt[:end] + " " + SUBJECT_MARKER + prompt[end:]
    return prompt


def prompt_with_sentinels(prompt: str) -> tuple[str, int]:
    """Replace markers by the sentinel string; returns the new prompt and the number of markers."""
    if SENTINEL_TEXT in prompt:
        raise ValueError(f"the prompt contains {SENTINEL_TEXT}, which this node reserves; remove it")
    return prompt.replace(SUBJECT_MARKER, " " + SENTINEL_TEXT + " "), prompt.count(SUBJECT_MARKER)


def remove_sentinels(chunks: list[list[Token]], sentinel_token: int, pad_token: int) -> MarkedTokens:
    """Drop sentinel tokens (id == sentinel_token, word id != 0) and mark the token before each."""
    clean_chunks: list[list[Token]] = []
    positions: list[int] = []
    last_word_position = None
    offset = 0
    for chunk in chunks:
        clean = []
        for token in chunk:
            token_id, _, word_id = token
            if token_id == sentinel_token and word_id != 0:
                if last_word_position is None:
                    raise ValueError(f"a {SUBJECT_MARKER} marker has no word before it; write it right after the subject's word, "
                                     f"e.g. 'a man {SUBJECT_MARKER} reading'")
                if last_word_position in positions:
                    raise ValueError(f"two {SUBJECT_MARKER} markers follow the same word; each subject needs its own word")
                positions.append(last_word_position)
                continue
            if word_id != 0:
                last_word_position = offset + len(clean)
            clean.append(token)
        clean += [(pad_token, 1.0, 0)] * (len(chunk) - len(clean))
        clean_chunks.append(clean)
        offset += len(clean)
    return MarkedTokens(clean_chunks, positions)
