"""Spelling tasks generated from a word list: SpellingBee ("How many r are in strawberry?",
counted by hand, checked with the calculator's `'word'.count('r')`, answered after `####`) and
SimpleSpelling ("Spell the word: cat" -> "cat:c,a,t"), the skill that makes counting hard for a
model that sees tokens, not letters.

Example i of a split is drawn from `random.Random("<task>/<split>/<i>")`, so it is the same in
every process. nanochat seeded its test split with -(i+1), and Python seeds n and -n alike: test
example i was train example i+1. Here the splits also draw from disjoint word lists (one word in
ten, by a checksum of the word, is a test word), so no test example's word is ever trained on,
whatever the sizes.
"""
import random
import zlib

from nanochat_jax.tasks import sources
from nanochat_jax.tasks.base import Task, check_choice
from nanochat_jax.tasks.gsm8k import final_answer_matches

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
LOCAL_WORDS = "words/words3to10.txt"
SPLITS = ("train", "test")
TEST_WORD_SHARE = 10  # one word in this many is a test word
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
QUOTES = ("", "'", '"')
QUESTIONS = (  # nanochat's phrasings, in several languages
    "How many {letter} are in the word {word}", "How many {letter} are in {word}",
    "Count the number of {letter} in {word}", "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}", "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}", "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}", "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}", "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}", "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}", "Count all the {letter} in {word}",
    "How many times is {letter} in {word}", "Number of {letter} in {word}",
    "Total count of {letter} in {word}", "How many {letter} does {word} have",
    "How many {letter} does {word} contain", "What's the number of {letter} in {word}",
    "{word} has how many {letter}", "In {word}, count the {letter}", "How many {letter} appear in {word}",
    "Count the {letter} in {word}", "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}", "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?", "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}", "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}", "{word}里有几个{letter}", "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요", "{word}에서 {letter}의 개수는", "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}", "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}", "Wie oft kommt {letter} in {word} vor", "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか", "{word}の中に{letter}がいくつ", "{word}に{letter}が何回出てくる",
)


def is_test_word(word: str) -> bool:
    return zlib.crc32(word.encode()) % TEST_WORD_SHARE == 0


def load_words(split: str, data_dir=None) -> list[str]:
    """The split's words: lowercased, letters a-z only, each once, in the list's order."""
    folder = sources.local_dir(data_dir)
    path = sources.local_file(folder, LOCAL_WORDS) if folder else sources.fetch(WORD_LIST_URL)
    words = dict.fromkeys(line.strip().lower() for line in path.read_text(encoding="utf-8").splitlines())
    return [w for w in words if w.isascii() and w.isalpha() and is_test_word(w) == (split == "test")]


class _Spelling(Task):

    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        check_choice(f"{type(self).__name__} split", split, SPLITS)
        self.size, self.split = size, split
        self.words = load_words(split, data_dir)

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{type(self).__name__}/{self.split}/{index}")


class SpellingBee(_Spelling):

    def get_example(self, index: int) -> dict:
        rng = self._rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(ALPHABET)
        question = rng.choice(QUESTIONS)
        if rng.random() < 0.3:  # people who do not use shift
            question = question.lower()
        letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
        question = question.format(letter=f"{letter_quote}{letter}{letter_quote}",
                                   word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            question += "?"
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": _count_solution(word, letter)}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return final_answer_matches(conversation, completion)


def _count_solution(word: str, letter: str) -> list[dict]:
    """Spell the word, count by hand, check with the calculator, answer after `####`. No space
    between a position and its letter: `1:a` keeps the letter the same token as in the spelling."""
    count, steps = 0, []
    for position, char in enumerate(word, 1):
        count += char == letter
        steps.append(f"{position}:{char} hit! count={count}\n" if char == letter else f"{position}:{char}\n")
    by_hand = (f"We are asked to find the number '{letter}' in the word '{word}'. "
               "Let me try a manual approach first.\n\n"
               f"First spell the word out:\n{word}:{','.join(word)}\n\n"
               f"Then count the occurrences of '{letter}':\n" + "".join(steps) + f"\nThis gives us {count}.")
    return [{"type": "text", "text": by_hand},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"}]


class SimpleSpelling(_Spelling):

    def get_example(self, index: int) -> dict:
        word = self._rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
