"""Marker and subject-word handling on token chunks shaped like ComfyUI's tokenizer output."""
import pytest

from subject_personalization.encoders.subject_prompt import (SENTINEL_TEXT, SUBJECT_MARKER, mark_subject_words,
                                                             prompt_with_sentinels, remove_sentinels, split_subject_words)

START, END = 49406, 49407


def chunk(words_tokens, length=8):
    """[(word_id, [tokens])] -> one padded chunk of (token, weight, word_id) triples."""
    body = [(START, 1.0, 0)] + [(token, 1.0, word_id) for word_id, tokens in words_tokens for token in tokens]
    body.append((END, 1.0, 0))
    return body + [(END, 1.0, 0)] * (length - len(body))


def test_marker_marks_the_token_before_it_and_is_removed():
    chunks = [chunk([(1, [10, 11, END, 12, 13, END])])]  # "a man<m> and a woman<m>"
    marked = remove_sentinels(chunks, sentinel_token=END, pad_token=END)
    assert marked.subject_positions == [2, 4]
    assert [token for token, _, _ in marked.chunks[0]] == [START, 10, 11, 12, 13, END, END, END]


def test_positions_count_across_chunks():
    chunks = [chunk([(1, [10, 11, 12, 13, 14, 15])]), chunk([(1, [16, END, 17])])]
    marked = remove_sentinels(chunks, sentinel_token=END, pad_token=END)
    assert marked.subject_positions == [8 + 1]
    assert all(len(c) == 8 for c in marked.chunks)


def test_marker_at_the_start_of_a_chunk_marks_the_last_word_of_the_previous_one():
    chunks = [chunk([(1, [10, 11, 12, 13, 14, 15])]), chunk([(1, [END, 17])])]
    assert remove_sentinels(chunks, END, END).subject_positions == [6]


def test_marker_without_a_word_before_it_is_an_error():
    with pytest.raises(ValueError, match="no word before it"):
        remove_sentinels([chunk([(1, [END, 10])])], END, END)


def test_two_markers_on_one_word_is_an_error():
    with pytest.raises(ValueError, match="same word"):
        remove_sentinels([chunk([(1, [10, END, END])])], END, END)


def test_padding_end_tokens_are_not_mistaken_for_markers():
    marked = remove_sentinels([chunk([(1, [10, 11])])], END, END)
    assert marked.subject_positions == []


def test_prompt_with_sentinels_counts_markers_and_rejects_the_reserved_string():
    text, count = prompt_with_sentinels(f"a man{SUBJECT_MARKER}, a dog {SUBJECT_MARKER}")
    assert count == 2 and SUBJECT_MARKER not in text and text.count(SENTINEL_TEXT) == 2
    with pytest.raises(ValueError, match="reserves"):
        prompt_with_sentinels(f"a man {SENTINEL_TEXT}")


@pytest.mark.parametrize("prompt, words, expected", [
    ("a man and a woman reading", ["man", "woman"], f"a man {SUBJECT_MARKER} and a woman {SUBJECT_MARKER} reading"),
    ("a woman and a man", ["man", "woman"], f"a woman {SUBJECT_MARKER} and a man {SUBJECT_MARKER}"),
    ("a man, a man.", ["man", "man"], f"a man {SUBJECT_MARKER}, a man {SUBJECT_MARKER}."),
    ("the Old Man sits", ["old man"], f"the Old Man {SUBJECT_MARKER} sits"),
    ("a woman and a man", ["man"], f"a woman and a man {SUBJECT_MARKER}"),
])
def test_subject_words_become_markers(prompt, words, expected):
    assert mark_subject_words(prompt, words) == expected


def test_subject_word_must_be_a_whole_word_in_the_prompt():
    with pytest.raises(ValueError, match="'man' is not in the prompt"):
        mark_subject_words("a woman reading", ["man"])
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        mark_subject_words("a dog", ["dog", "dog"])
    with pytest.raises(ValueError, match="either markers or subject_words"):
        mark_subject_words(f"a man {SUBJECT_MARKER}", ["man"])


def test_split_subject_words():
    assert split_subject_words(" man, old woman ,, dog") == ["man", "old woman", "dog"]
    assert split_subject_words("") == []
