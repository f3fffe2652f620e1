"""Chat data the project makes itself, so the tiny config's mid, SFT and RL stages need no network:
identity conversations, arithmetic word problems solved with calculator calls, and the same
problems as a verifiable task for RL.

Example i of a split is drawn from `random.Random("<stream>/<split>/<i>")`, the same in every
process. Splits are disjoint by content, not only by seed: every drawn example has a bucket, a
checksum of its key (the whole conversation, or the problem's question) modulo 10, and a split
redraws until the bucket is one of its own. Bucket 0 is test; the word problems' train buckets
1-6 are SFT's and 7-9 RL's, so RL never trains on a problem SFT saw. The word problems are this
module's own templates (shopping, sharing, travel, work time), not GSM8K's.
"""
import json
import random
import zlib

from nanochat_jax.tasks.base import Task, check_choice
from nanochat_jax.tasks.gsm8k import final_answer_matches
from nanochat_jax.tools import use_calculator

SPLITS = ("train", "test")
TEST_BUCKETS = (0,)


class _Synthetic(Task):
    """`size` examples per split, each drawn by `draw(rng)` until its bucket belongs to the split."""

    stream: str
    train_buckets: tuple[int, ...]

    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        check_choice(f"{type(self).__name__} split", split, SPLITS)
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size, self.split = size, split
        self.buckets = TEST_BUCKETS if split == "test" else self.train_buckets

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"{self.stream}/{self.split}/{index}")
        while True:
            key, draft = self.draw(rng)
            if bucket(key) in self.buckets:
                return self.build(draft)

    def draw(self, rng: random.Random) -> tuple[str, object]:
        """The text whose checksum decides the split, and a draft that `build` turns into the
        conversation (only once the draft is kept)."""
        raise NotImplementedError

    def build(self, draft) -> dict:
        return draft


def bucket(key: str) -> int:
    return zlib.crc32(key.encode()) % 10


# ---- identity --------------------------------------------------------------------------------

GREETINGS = ("Hi!", "Hello there.", "Hey, how are you?", "Good morning!", "hi", "Hello! Nice to meet you.")
GREETING_REPLIES = ("Hello! How can I help you today?", "Hi! I'm doing well, thanks. What can I do for you?",
                    "Hey! Nice to meet you. What would you like to talk about?",
                    "Hello! I'm nanochat-jax. Ask me anything and I'll do my best.")
# topic: (questions, answers); any question of a topic may take any of its answers
IDENTITY_TOPICS = {
    "name": (("Who are you?", "What's your name?", "What should I call you?", "What are you?",
              "Introduce yourself."),
             ("I'm nanochat-jax, a small language model.",
              "My name is nanochat-jax. I'm a small chat model trained with the nanochat-jax project.",
              "I'm nanochat-jax: a small language model you can chat with.")),
    "maker": (("Who made you?", "Who trained you?", "Where do you come from?", "How were you built?"),
              ("I was trained with nanochat-jax, an open-source project that rewrites Andrej Karpathy's "
               "nanochat in JAX. Whoever ran it trained me, from pretraining to chat fine-tuning.",
               "The nanochat-jax project made me: a JAX reimplementation of Karpathy's nanochat, small "
               "enough to read in an afternoon. I was pretrained on web text, then fine-tuned on "
               "conversations.")),
    "training": (("How were you trained?", "What data did you learn from?", "How did you learn to chat?"),
                 ("First I was pretrained to predict the next token of web text. Then I was midtrained and "
                  "fine-tuned on conversations, spelling exercises and arithmetic problems with a "
                  "calculator, and finally trained with reinforcement learning on arithmetic.",
                  "I learned from text: pretraining on documents, then conversations that taught me to "
                  "chat, to spell and to use a calculator.")),
    "abilities": (("What can you do?", "What are you good at?", "How can you help me?"),
                  ("I can chat, answer simple questions, spell words, count letters and do arithmetic "
                   "with a calculator tool.",
                   "I can hold a short conversation, spell words and count their letters, and work "
                   "through small arithmetic word problems using a calculator.")),
    "limits": (("What can't you do?", "Can you browse the internet?", "Are you always right?",
                "Are you as smart as the big chatbots?", "Do you remember our earlier chats?"),
               ("I'm a small model, so I often make mistakes: please double-check anything important. I "
                "can't browse the internet and I don't remember past conversations.",
                "No. I'm much smaller than the big assistants, I have no internet access and I only "
                "know what is in this conversation, so I can be wrong, sometimes confidently.")),
    "size": (("How big are you?", "How many parameters do you have?"),
             ("I'm small: from a few million parameters on a laptop up to a couple of billion on a GPU "
              "node, depending on the configuration I was trained with.",
              "That depends on the run that trained me, but nanochat-jax models are small, a few "
              "million to about two billion parameters.")),
    "language": (("Which languages do you speak?", "Do you speak French?"),
                 ("I work best in English, the language most of my training data was in.",
                  "Mostly English. I may understand a little of other languages, but not well.")),
}


class IdentityConversations(_Synthetic):
    """A few turns in which the assistant says who it is, what made it, what it can and cannot do."""

    stream, train_buckets = "IdentityConversations", tuple(range(1, 10))

    def draw(self, rng):
        messages = []
        if rng.random() < 0.5:
            messages += [("user", rng.choice(GREETINGS)), ("assistant", rng.choice(GREETING_REPLIES))]
        for topic in rng.sample(sorted(IDENTITY_TOPICS), rng.randint(1, 3)):
            questions, answers = IDENTITY_TOPICS[topic]
            question = rng.choice(questions)
            messages += [("user", question.lower() if rng.random() < 0.2 else question),
                         ("assistant", rng.choice(answers))]
        conversation = {"messages": [{"role": role, "content": text} for role, text in messages]}
        return json.dumps(conversation), conversation


# ---- arithmetic word problems ----------------------------------------------------------------

NAMES = ("Ada", "Ben", "Chloe", "Dev", "Elena", "Femi", "Grace", "Hiro", "Ines", "Jonas", "Kai", "Lena")
ITEMS = ("notebooks", "apples", "pens", "tickets", "mugs", "plants")
SHARED = ("stickers", "marbles", "cookies", "cards", "beads")


def _change(rng):
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    count, price = rng.randint(2, 9), rng.randint(2, 15)
    paid = next(b for b in (20, 50, 100, 200) if b > count * price)
    question = (f"{name} buys {count} {items} at ${price} each and pays with a ${paid} bill. "
                f"How much change does {name} get back, in dollars?")
    steps = [(f"The {items} cost ", f"{count}*{price}", " dollars in total. "),
             ("The change is ", f"{paid}-{count * price}", " dollars.")]
    return question, steps


def _sharing(rng):
    name, things = rng.choice(NAMES), rng.choice(SHARED)
    friends = rng.randint(2, 9)
    total = friends * rng.randint(3, 20) + rng.randint(0, friends - 1)
    question = (f"{name} has {total} {things} and shares them equally among {friends} friends, "
                f"keeping whatever cannot be shared. How many {things} does {name} keep?")
    steps = [("Each friend gets ", f"{total}//{friends}", f" {things}, "),
             ("which uses ", f"{total // friends}*{friends}", f" {things}. "),
             (f"{name} keeps ", f"{total}-{(total // friends) * friends}", f" {things}.")]
    return question, steps


def _travel(rng):
    name = rng.choice(NAMES)
    speed1, hours1 = rng.randint(3, 12) * 10, rng.randint(1, 5)
    speed2, hours2 = rng.randint(3, 12) * 10, rng.randint(1, 4)
    question = (f"{name} drives for {hours1} hours at {speed1} km per hour, then for {hours2} hours at "
                f"{speed2} km per hour. How many kilometres does {name} drive in all?")
    steps = [("The first part is ", f"{speed1}*{hours1}", " km. "),
             ("The second part is ", f"{speed2}*{hours2}", " km. "),
             ("Together that is ", f"{speed1 * hours1}+{speed2 * hours2}", " km.")]
    return question, steps


def _work_time(rng):
    name = rng.choice(NAMES)
    minutes, rate = rng.choice((30, 45, 60, 90, 120, 150)), rng.randint(6, 30)
    days = rng.choice([d for d in range(2, 7) if minutes * d % 60 == 0])  # whole hours only
    question = (f"{name} practises the piano for {minutes} minutes a day for {days} days and pays "
                f"${rate} for every hour of practice room. How many dollars does {name} pay?")
    steps = [("In total that is ", f"{minutes}*{days}", " minutes, "),
             ("which is ", f"{minutes * days}/60", " hours. "),
             ("The room costs ", f"{minutes * days // 60}*{rate}", " dollars.")]
    return question, steps


TEMPLATES = {"change": _change, "sharing": _sharing, "travel": _travel, "work_time": _work_time}


def solve(steps) -> tuple[list[dict], str]:
    """Assistant parts for (text, expression, text) steps: each expression a calculator call whose
    output part is what `use_calculator` returns for it; and the last output, the answer (the
    templates end on a whole number)."""
    parts, value = [], None
    for before, expression, after in steps:
        value = use_calculator(expression)
        parts += [{"type": "text", "text": before}, {"type": "python", "text": expression},
                  {"type": "python_output", "text": str(value)}, {"type": "text", "text": after}]
    parts.append({"type": "text", "text": f"\n#### {value}"})
    return parts, str(value)


class ArithmeticWordProblems(_Synthetic):
    """Small word problems, solved in steps with calculator calls, answered after `####` (as
    GSM8K, and judged as GSM8K: the number after `#### ` must equal the reference's). Examples
    also carry their `template` and `answer`."""

    eval_type = "generative"
    stream, train_buckets = "ArithmeticWordProblems", (1, 2, 3, 4, 5, 6)

    def draw(self, rng):
        template = rng.choice(sorted(TEMPLATES))
        question, steps = TEMPLATES[template](rng)
        return question, (template, question, steps)

    def build(self, draft):
        template, question, steps = draft
        parts, answer = solve(steps)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "template": template, "answer": answer}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return final_answer_matches(conversation, completion)


class ArithmeticRL(ArithmeticWordProblems):
    """The same family for RL: its own seed stream and train buckets, so none of its training
    problems is one SFT trained on; `reward` is 1.0 for the right `####` answer, else 0.0."""

    stream, train_buckets = "ArithmeticRL", (7, 8, 9)

