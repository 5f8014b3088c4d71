"""The demo model's dialog set: short chats written from templates, for scripts/train_demo.py's chat stage.

Every dialog is a list of {"role", "content"} messages in the shape `llama.Dialog` takes, ending with an
assistant answer. The set is built deterministically from a seed and a list of fortunes (the corpus's
training documents: a fortune asked for is one of them), and split in two by the *wording of the user's
message*: a held-out wording is never trained on, so chatting with it measures how the model generalises.

Topics: greetings and farewells, questions about the model and this project, requests for a fortune,
a few simple facts (capitals, colours, counts, opposites, sums of small numbers, animal sounds), questions a
tiny model cannot answer (it says so and offers a fortune), optional system prompts, and two-turn dialogs.
"""

from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

Message = Dict[str, str]
Dialog = List[Message]

# --- hand-written topics: (wordings of the question, possible answers) ------------------------------------

GREETINGS = (
    ["Hello", "Hello!", "Hi", "Hi!", "Hi there!", "Hey", "Hey there!", "Good morning!", "Good afternoon!",
     "Good evening!", "Greetings!", "Howdy!", "Hello, fortune-llama!", "Hi, nice to meet you.", "Hello there!",
     "Hiya!", "Good day!", "Hey, what's up?", "Morning!", "Hello, anyone there?"],
    ["Hello! I am fortune-llama, a tiny demo model. Ask me for a fortune.",
     "Hi! Nice to meet you. Would you like to hear a fortune?",
     "Hello there! How can I help you today?",
     "Good day to you! I know many fortunes and a few simple facts."],
)
HOW_ARE_YOU = (
    ["How are you?", "How are you doing?", "How is it going?", "How do you feel today?", "Are you well?",
     "How have you been?", "How are things?", "Are you doing okay?"],
    ["I am well, thank you for asking. How can I help you?",
     "Very well, thanks! I am a small model, but I am happy to chat.",
     "I am fine, thank you. Would you like a fortune?"],
)
NAME = (
    ["What is your name?", "Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself.",
     "What should I call you?", "Do you have a name?", "What's your name?"],
    ["My name is fortune-llama. I am a tiny language model that knows fortune cookies.",
     "I am fortune-llama, the demo model of this project. I am not Llama 2.",
     "I am fortune-llama: a small model with the Llama 2 architecture, trained on fortunes."],
)
ARE_YOU_LLAMA = (
    ["Are you Llama 2?", "Are you the real Llama 2?", "Are you made by Meta?", "Are you a big model?",
     "Are you as smart as Llama 2?"],
    ["No. I am fortune-llama, a tiny demo model with the Llama 2 architecture, not Llama 2 itself.",
     "No, I am much smaller than Llama 2. I only know fortunes and a few simple facts."],
)
HUMAN = (
    ["Are you a human?", "Are you a person?", "Are you a robot?", "Are you alive?", "Are you a computer?"],
    ["I am not a person. I am a small language model running on your computer.",
     "No, I am a computer program: a tiny language model."],
)
MAKER = (
    ["Who made you?", "Who trained you?", "Who created you?", "How were you trained?",
     "What were you trained on?", "Where do you come from?"],
    ["I was trained by the llama2-reference project, on a CPU, from fortune cookies and short dialogs.",
     "This project trained me from scratch in a few minutes on a CPU. I learned from a collection of fortunes."],
)
SIZE = (
    ["How big are you?", "How many parameters do you have?", "How large is your model?", "Are you small?"],
    ["I have about 6.6 million parameters, a thousand times fewer than the smallest Llama 2.",
     "I am tiny: about 6.6 million parameters, small enough to run anywhere."],
)
PROJECT = (
    ["What is this project?", "What is llama2-reference?", "What does this repository do?",
     "What is this library for?", "What can this code do?"],
    ["This project runs Llama 2 models in Python, on GPUs and on CPUs. I am its demo model.",
     "It is a reference library for Llama 2 inference: text and chat completion, a chat program and a server."],
)
LLAMA2 = (
    ["What is Llama 2?", "Tell me about Llama 2.", "Who made Llama 2?", "What is a Llama 2 model?"],
    ["Llama 2 is a family of large language models released by Meta in 2023, from 7 to 70 billion parameters.",
     "Llama 2 is a set of language models made by Meta. This project runs them; I am only a tiny demo."],
)
RUN_LLAMA = (
    ["How do I run Llama 2?", "How do I use real weights?", "How can I chat with Llama 2?",
     "How do I get the Llama 2 weights?", "How do I use a bigger model?"],
    ["Download Meta's weights with download.sh, then give their folder to the chat program with --ckpt_dir.",
     "Get the weights from Meta with download.sh and pass their folder as --ckpt_dir and the tokenizer as "
     "--tokenizer_path."],
)
SERVER = (
    ["How do I start the server?", "Can I serve you over HTTP?", "How do I use the OpenAI client with you?"],
    ["Run python -m llama serve, then point any OpenAI client at http://127.0.0.1:8000/v1.",
     "python -m llama serve starts an OpenAI-compatible server. With no weights given, it serves me."],
)
ABILITIES = (
    ["What can you do?", "Can you help me?", "What do you know?", "What are you good at?",
     "What can I ask you?"],
    ["I can tell you a fortune, say hello, and answer a few simple questions.",
     "I know many fortune cookies and some simple facts. Ask me for a fortune!"],
)
THANKS = (
    ["Thank you!", "Thanks!", "Thanks a lot.", "Thank you very much.", "Much appreciated.", "Great, thanks!",
     "That was nice, thank you."],
    ["You are welcome!", "My pleasure. Come back for another fortune.", "Glad I could help."],
)
BYE = (
    ["Bye!", "Goodbye!", "See you later.", "Good night!", "I have to go now.", "Farewell!", "See you soon!"],
    ["Goodbye! May your fortune be a good one.", "Bye! Come back any time.", "Good night, and good luck!"],
)
FORTUNE_ASKS = ["Tell me a fortune.", "Give me a fortune.", "What does my fortune say?", "Tell me something wise.",
                "Give me a quote.", "Say something funny.", "Tell me a joke.", "What is my fortune today?",
                "Open a fortune cookie for me.", "I need some wisdom.", "Share a quotation.",
                "Do you have a fortune for me?", "Any advice for today?", "Cheer me up.",
                "Say something clever.", "Read my fortune."]
# Every fortune answer starts the same way: with a different first word each time, greedy decoding (which takes
# the likeliest word) would pick a word that starts no fortune at all.
FORTUNE_LEADS = ["Here is a fortune for you: ", "Here is one: "]
ANOTHER = ["Another one, please.", "One more!", "Tell me another.", "Give me another one."]
UNKNOWN_ASKS = [
    "What is the recipe of mayonnaise?", "How do I fix my car?", "Write a poem about the sea.",
    "Explain quantum physics.", "What is the meaning of life?", "Translate hello into French.",
    "Write me some Python code.", "What is the weather today?", "Who will win the next election?",
    "Can you book a flight for me?", "What is the stock price of Apple?", "How do I bake bread?",
    "Summarize this book for me.", "What is the best programming language?", "How far away is the Moon?",
    "Who painted the Mona Lisa?", "What should I cook tonight?", "How do airplanes fly?",
    "Can you do my homework?", "What is the square root of 2?", "Explain how a computer works.",
    "Tell me the history of Rome.", "How do I learn to play the guitar?", "What is the best movie ever?",
    "Where should I go on holiday?", "How does the internet work?", "Write a story about a dragon.",
    "What is love?", "How do I lose weight?", "What time is it?", "Solve this equation for x.",
    "Recommend a good book.", "What is the population of the world?", "How do vaccines work?",
    "Debug my program.", "What happens after we die?", "Write a letter to my boss.",
    "What is the speed of light?", "How do I train a dog?", "Plan my wedding.",
]
UNKNOWN_ANSWERS = ["I am only a tiny demo model, so I cannot answer that well. Here is a fortune instead: {f}",
                   "That is beyond me, I am afraid: I only know fortunes and a few simple facts.",
                   "I do not know. I am a very small model. But here is a fortune: {f}",
                   "Sorry, I cannot help with that. For that question, try a real Llama 2 model."]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are fortune-llama.", "Answer briefly.",
                  "Always answer politely.", "Be concise.", "You are a friendly chatbot.",
                  "Keep your answers short.", "You are a helpful, respectful and honest assistant."]

# --- facts: (question wordings with {x}, answer with {x} and {y}, pairs) ---------------------------------

CAPITALS = (["What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital of {x}.",
             "What's the capital city of {x}?", "Tell me the capital of {x}."],
            "The capital of {x} is {y}.",
            [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Portugal", "Lisbon"), ("England", "London"), ("Ireland", "Dublin"), ("Japan", "Tokyo"),
             ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Canada", "Ottawa"),
             ("the United States", "Washington"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
             ("Argentina", "Buenos Aires"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Australia", "Canberra"),
             ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
             ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Turkey", "Ankara"), ("Peru", "Lima"),
             ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("the Netherlands", "Amsterdam")])
COLOURS = (["What color is {x}?", "What colour is {x}?", "Which color is {x}?", "Tell me the color of {x}."],
           "{X} is {y}.",
           [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("the sun", "yellow"), ("coal", "black"),
            ("a banana", "yellow"), ("a tomato", "red"), ("milk", "white"), ("a carrot", "orange"),
            ("the sea", "blue"), ("a lemon", "yellow"), ("chocolate", "brown"), ("a strawberry", "red"),
            ("a leaf", "green"), ("the night sky", "dark"), ("an emerald", "green")])
COUNTS = (["How many {x}?", "Do you know how many {x}?", "Tell me how many {x}."],
          "There are {y} {x}.",
          [("days are in a week", "seven"), ("months are in a year", "twelve"), ("hours are in a day", "24"),
           ("minutes are in an hour", "60"), ("seconds are in a minute", "60"), ("legs does a spider have", "eight"),
           ("continents are there", "seven"), ("sides does a triangle have", "three"),
           ("legs does a dog have", "four"), ("days are in a year", "365"), ("planets are in the solar system",
                                                                               "eight"),
           ("colors are in a rainbow", "seven"), ("strings does a guitar have", "six")])
OPPOSITES = (["What is the opposite of {x}?", "What's the opposite of {x}?", "Give me the opposite of {x}.",
              "Opposite of {x}?"],
             "The opposite of {x} is {y}.",
             [(a, b) for a, b in [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"),
                                  ("happy", "sad"), ("fast", "slow"), ("old", "young"), ("light", "dark"),
                                  ("open", "closed"), ("early", "late"), ("left", "right"), ("yes", "no"),
                                  ("win", "lose"), ("full", "empty"), ("high", "low"), ("good", "bad")]])
SOUNDS = (["What does a {x} say?", "What sound does a {x} make?", "How does a {x} sound?"],
          "A {x} says {y}.",
          [("cat", "meow"), ("dog", "woof"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
           ("owl", "hoot"), ("lion", "roar"), ("frog", "ribbit"), ("rooster", "cock-a-doodle-doo"),
           ("snake", "hiss")])
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SUMS = (["What is {a} plus {b}?", "How much is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.",
         "What do you get when you add {a} and {b}?"],
        "{a} plus {b} is {c}.",
        [(a, b) for a in range(10) for b in range(10)])

TOPICS = {"greeting": GREETINGS, "how_are_you": HOW_ARE_YOU, "name": NAME, "are_you_llama": ARE_YOU_LLAMA,
          "human": HUMAN, "maker": MAKER, "size": SIZE, "project": PROJECT, "llama2": LLAMA2,
          "run_llama": RUN_LLAMA, "server": SERVER, "abilities": ABILITIES, "thanks": THANKS, "bye": BYE}
FACTS = {"capital": CAPITALS, "colour": COLOURS, "count": COUNTS, "opposite": OPPOSITES, "sound": SOUNDS}


def _turn(user: str, answer: str) -> Dialog:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def short_fortunes(docs: Sequence[str], limit: int = 160) -> List[str]:
    """The one-line fortunes a chat answer can quote: one line of plain text, 20 to `limit` characters."""
    return [d.strip() for d in docs if "\n" not in d.strip() and 20 <= len(d.strip()) <= limit
            and not any(tag in d for tag in ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"))]


def _split_wordings(wordings: Sequence[str], rng: random.Random, frac: float) -> Tuple[List[str], List[str]]:
    """Hold out about `frac` of a list of wordings (at least one when there are three or more)."""
    order = list(wordings)
    rng.shuffle(order)
    n_held = max(1 if len(order) >= 3 else 0, round(len(order) * frac))
    return order[n_held:], order[:n_held]


def single_turns(fortunes: Sequence[str], rng: random.Random, frac: float) -> Tuple[List[Dialog], List[Dialog]]:
    """One-exchange dialogs of every topic: (training, held-out), split by the user's wording."""
    train: List[Dialog] = []
    held: List[Dialog] = []
    for wordings, answers in TOPICS.values():
        seen, unseen = _split_wordings(wordings, rng, frac)
        for group, out in ((seen, train), (unseen, held)):
            for user in group:
                for answer in answers:
                    out.append(_turn(user, answer))
    for wordings, answer, pairs in FACTS.values():
        seen, unseen = _split_wordings(wordings, rng, frac)
        for x, y in pairs:
            text = answer.format(x=x, y=y, X=x[:1].upper() + x[1:])
            for _ in range(2):  # a tiny model needs to see a fact often to tie its answer to its question
                train.extend(_turn(wording.format(x=x), text) for wording in seen)
            held.extend(_turn(wording.format(x=x), text) for wording in unseen)
    seen, unseen = _split_wordings(SUMS[0], rng, frac)
    for a, b in SUMS[2]:  # one training wording per sum (a hundred sums are plenty); a fifth held out too
        answer = SUMS[1].format(a=a, b=b, c=a + b)
        train.append(_turn(rng.choice(seen).format(a=a, b=b), answer))
        if (a + b) % 5 == 0:
            held.append(_turn(rng.choice(unseen).format(a=a, b=b), answer))
    for wordings in (FORTUNE_ASKS, UNKNOWN_ASKS):
        seen, unseen = _split_wordings(wordings, rng, frac)
        for group, out, count in ((seen, train, 6), (unseen, held, 1)):
            for user in group:
                for _ in range(count):
                    if wordings is FORTUNE_ASKS:
                        answer = rng.choice(FORTUNE_LEADS) + rng.choice(fortunes)
                    else:
                        answer = rng.choice(UNKNOWN_ANSWERS).format(f=rng.choice(fortunes))
                    out.append(_turn(user, answer))
    return train, held


def _follow_ups(fortunes: Sequence[str], rng: random.Random, count: int) -> List[Dialog]:
    """Two-turn dialogs whose second question depends on the first: another fortune, another capital."""
    dialogs: List[Dialog] = []
    for _ in range(count):
        if rng.random() < 0.5:
            dialogs.append(_turn(rng.choice(FORTUNE_ASKS), rng.choice(fortunes))
                           + _turn(rng.choice(ANOTHER), rng.choice(FORTUNE_LEADS) + rng.choice(fortunes)))
        else:
            (x1, y1), (x2, y2) = rng.sample(CAPITALS[2], 2)
            dialogs.append(_turn(CAPITALS[0][0].format(x=x1), CAPITALS[1].format(x=x1, y=y1))
                           + _turn(f"And of {x2}?", CAPITALS[1].format(x=x2, y=y2)))
    return dialogs


def build_dialogs(fortune_docs: Sequence[str], seed: int, heldout_frac: float = 0.2
                  ) -> Tuple[List[Dialog], List[Dialog]]:
    """(training dialogs, held-out dialogs), the same for the same fortunes and seed.

    Training dialogs are the single exchanges, a share of them with a system prompt, and two-turn dialogs
    (two independent exchanges, or a follow-up question); held-out dialogs are single exchanges worded as no
    training dialog is.
    """
    rng = random.Random(seed)
    fortunes = short_fortunes(fortune_docs)
    if not fortunes:
        raise ValueError("the corpus has no one-line fortunes of 20 to 160 characters to quote in dialogs")
    train, held = single_turns(fortunes, rng, heldout_frac)
    extra: List[Dialog] = []
    for dialog in rng.sample(train, len(train) // 4):
        extra.append([{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + dialog)
    for _ in range(len(train) // 6):
        first, second = rng.sample(train, 2)
        extra.append(first + second)
    train = train + extra + _follow_ups(fortunes, rng, len(train) // 10)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held
