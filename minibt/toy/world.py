"""A synthetic world with ground truth, for running instruction backtranslation where every stage
can be measured.

Entities (made-up names) each have a few attributes (real English words) with made-up values. The
seed pairs ask about a subset of the attributes only; the unlabelled corpus holds one-fact answers
about more entities and all attributes, drowned in web noise; the evaluation asks about held-out
entities and attributes absent from the seed. The base model learns the facts of every entity in
pretraining (profile pages, "list of <attribute> by entity" pages), so a forward model can answer a
held-out question only if fine-tuning taught it to ask its own knowledge about unseen attributes:
which is what the augmented pairs add over the seed (see shared/TOY-WORLD-FINDINGS.md).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from minibt import prompts
from minibt.errors import RecipeError

# Distinct real English nouns, none an inflection of another and none used by the question forms.
ATTRIBUTE_WORDS = """
color height weight hometown birthplace motto mascot emblem anthem flower tree bird river mountain
capital currency language dialect religion cuisine dish beverage fruit spice sport hobby pet horse
ship wagon sword shield banner flag crest tower castle bridge harbor garden market school teacher
mentor rival ally spouse sibling cousin uncle aunt heir founder patron guardian servant tailor doctor
lawyer banker captain admiral chancellor mayor governor sheriff poet painter sculptor composer
singer dancer architect author publisher editor brewer baker instrument song poem novel painting
statue festival holiday season month planet constellation gem metal fabric perfume tea wine cheese
bread soup dessert candy toy puzzle riddle proverb slogan nickname password rank guild clan tribe
faction team league district province county village island valley forest lake desert canyon cave
volcano glacier meadow orchard vineyard farm mill quarry workshop studio library museum theater
stadium temple shrine chapel monastery academy university hospital prison fortress palace mansion
cottage cabin carriage sled bicycle airship lantern compass clock mirror bell drum flute harp violin
trumpet piano guitar banjo kettle blanket pillow carpet umbrella hat cloak glove scarf necklace
bracelet crown helmet armor spear axe hammer anvil saddle canoe raft anchor telescope diary
newspaper magazine radio tractor engine rocket satellite comet element mineral crystal pearl amber
marble granite timber herb mushroom vegetable grain berry melon pepper onion honey sauce pastry
cake biscuit noodle dumpling salad breakfast owl fox wolf bear deer rabbit turtle snake lizard frog
whale dolphin shark salmon eagle falcon parrot swan goose beetle butterfly spider melody ballad
opera sonnet fable legend saga portrait tapestry mosaic fountain lighthouse windmill barn stable
""".split()

_ATTRIBUTE_SET = set(ATTRIBUTE_WORDS)

# Generic question and answer forms (A: attribute, E: entity, V: value), shared by all attributes
# so that a model can carry a form over to attributes it was never asked about.
QUESTION_FORMS = ("What is the {a} of {e}?", "Tell me the {a} of {e}.", "Do you know {e}'s {a}?", "What is {e}'s {a}?")
ANSWER_FORMS = ("The {a} of {e} is {v}.", "{e}'s {a} is {v}.", "{v} is the {a} of {e}.")

# Pretraining list pages: per attribute, each naming this many entities that have it.
LIST_PAGES_PER_ATTRIBUTE = 3
ENTITIES_PER_LIST_PAGE = 8

# Syllables for made-up names: pronounceable, and tokenized into a few BPE pieces each.
_ONSETS = "b d f g k l m n p r s t v z br dr gr kr tr sh th".split()
_VOWELS = "a e i o u a e i o u ai ou".split()
_CODAS = ["", "", "", "n", "r", "l", "s"]

# Vocabulary of the web noise.
_PRODUCTS = "shoe phone laptop sofa mattress watch camera jacket backpack printer headphone lamp".split()
_SECTIONS = "News Sports Weather Shop Blog Events Photos Videos Jobs Travel Recipes Forum".split()
_PLACES = "market station park cafe library bakery harbor fair concert museum".split()
_ADJECTIVES = "nice funny strange quiet busy friendly tired cheerful boring lovely".split()
_WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_USERS = "Sam Alex Jo Chris Pat Robin Kim Lee".split()
_NOISE = {
    "ad": (
        "Big sale on every {p} this week! Save {n}% on your order. Free shipping on orders over ${m}0.",
        "Buy two of our {adj} {p} models and get one free. Offer ends {w}. Click here to shop now.",
        "Looking for a cheap {p}? Compare prices from {n} stores and save today.",
    ),
    "navigation": (
        "Home | {s[0]} | {s[1]} | {s[2]} | Contact us | Privacy policy | Sign in",
        "Skip to main content. Menu: {s[0]}, {s[1]}, {s[2]}. Search this site.",
        "Page {n} of {m}. Next page. Previous page. Back to top.",
    ),
    "chatter": (
        "lol that was so {adj} yesterday, see you all on {w}!",
        "Thanks for sharing this, {user}. Made my {w}.",
        "Anyone else think the weather has been {adj} lately? I stayed home all {w}.",
    ),
    "post": (
        "I met {e} at the {place} last {w}. {e} seemed {adj} and we talked for {n} minutes.",
        "Just saw a photo of {e} online. So {adj}! Share this with your friends.",
        "{e} was in the news again on {w}. Comments are closed on this post.",
    ),
    "forum": (  # {q}: a question of the world, asked and never answered
        "Quick question: {q} I looked everywhere and could not find it. Thanks in advance!",
        "{q} Asking for a friend. Any help is welcome.",
        "Hi all, {q} Please reply below. Posted by {user} on {w}.",
    ),
}
# Made-up names must never be a word the world's other texts use (a value called "Menu" would make
# a navigation bar state a fact).
_RESERVED = {
    w.lower()
    for text in [*ATTRIBUTE_WORDS, *QUESTION_FORMS, *ANSWER_FORMS, *_PRODUCTS, *_SECTIONS, *_PLACES,
                 *_ADJECTIVES, *_WEEKDAYS, *_USERS, *(t for ts in _NOISE.values() for t in ts),
                 prompts.RUBRIC, prompts.BACKWARD_SYSTEM]
    for w in re.findall(r"[A-Za-z]+", text)
}  # fmt: skip


@dataclass
class WorldConfig:
    """The toy world's knobs (the recipe's `toy:` section); the defaults are the default world."""

    seed: int = 0
    # --- the world
    entities: int = 200
    attributes: int = 150  # attribute words in use (at most len(ATTRIBUTE_WORDS))
    seed_attributes: int = 50  # the seed asks about these only
    attributes_per_entity: int = 8
    values_per_attribute: int = 10
    seed_entities: int = 100  # entities [0, seed_entities) give the seed pairs
    corpus_entities: int = 140  # entities [0, corpus_entities) give corpus facts; the rest are held out
    noise_fraction: float = 0.8  # share of noise texts in the unlabelled corpus
    list_pages: bool = True  # "list of <attribute> by entity" pages in pretraining
    profile_pages: int = 3  # pretraining pages per entity, each stating all its facts
    web_pages: int = 800  # noise texts in pretraining: ads, navigation, chatter, posts
    forum_posts: int = 400  # unanswered forum questions in pretraining
    rated_examples: int = 60  # seed pairs rated 1..5 as a human rater would, to teach the rubric
    # --- the base model
    vocab_size: int = 1600
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    # Many small steps memorize facts best in a fixed time (~2 min, held-out fact recall, seed 0):
    # batch 64 x 440 steps 34 %, 16 x 1,500 84 %, 8 x 2,400 62 %; at 16 x 1,400, lr 3e-3 gave 72 %
    # and lr 5e-3 52 % (noisy: one run each).
    pretrain_steps: int = 1400
    pretrain_batch: int = 16
    pretrain_seq_len: int = 64
    pretrain_lr: float = 3e-3

    def check(self, key: str = "toy") -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise RecipeError(f"{key}.{name}: must be {rule}, got {getattr(self, name)}")

        need(0 < self.attributes <= len(ATTRIBUTE_WORDS), "attributes", f"in [1, {len(ATTRIBUTE_WORDS)}]")
        need(0 < self.seed_attributes < self.attributes, "seed_attributes", "in [1, attributes)")
        need(0 < self.attributes_per_entity <= self.attributes, "attributes_per_entity", "in [1, attributes]")
        need(self.values_per_attribute >= 2, "values_per_attribute", ">= 2")
        need(0 < self.seed_entities <= self.corpus_entities, "seed_entities", "in [1, corpus_entities]")
        need(self.corpus_entities < self.entities, "corpus_entities", "below entities (the rest are held out)")
        need(0.0 <= self.noise_fraction < 1.0, "noise_fraction", "in [0, 1)")
        for name in ("profile_pages", "web_pages", "forum_posts", "rated_examples"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(self.vocab_size >= 300, "vocab_size", ">= 300 (256 bytes, specials, some merges)")
        for name in ("hidden_size", "layers", "heads", "pretrain_steps", "pretrain_batch", "pretrain_seq_len"):
            need(getattr(self, name) > 0, name, "> 0")
        need(self.hidden_size % self.heads == 0, "hidden_size", f"a multiple of heads ({self.heads})")
        need(self.pretrain_lr > 0, "pretrain_lr", "> 0")


def small_world_config(**overrides) -> WorldConfig:
    """A reduced world for tests: its base pretrains in ~35 s instead of ~105 s.

    Smaller than this and the base never learns to copy names from its context (hidden 64 or 400
    steps: myx wrote 0 % right instructions), and nothing downstream can be measured.
    """
    small = dict(
        entities=60, attributes=24, seed_attributes=10, attributes_per_entity=6, values_per_attribute=6,
        seed_entities=30, corpus_entities=45, web_pages=100, forum_posts=50, rated_examples=12,
        vocab_size=700, pretrain_steps=900,
    )  # fmt: skip
    return WorldConfig(**{**small, **overrides})


@dataclass
class World:
    entities: list[str]  # in index order: seed entities first, held-out entities last
    held_out_entities: list[str]  # in pretraining only: the evaluation asks about these
    attributes: list[str]
    seed_attributes: list[str]
    facts: dict[str, dict[str, str]]  # entity -> attribute -> value
    seed_pairs: list[dict] = field(default_factory=list)  # {instruction, output}
    corpus: list[dict] = field(default_factory=list)  # {text, label: fact|noise, entity, attribute, value}
    eval_questions: list[dict] = field(default_factory=list)  # {instruction, answer, entity, attribute, value}
    backward_eval: list[dict] = field(default_factory=list)  # {text, entity, attribute, value}
    rated_pairs: list[dict] = field(default_factory=list)  # {instruction, output, score}
    pretrain_texts: list[str] = field(default_factory=list)



def build_world(cfg: WorldConfig) -> World:
    """The world for `cfg`, the same for the same config.

    Each part draws from its own random stream (seeded by cfg.seed and the part's name), so turning
    one knob, e.g. the noise share, leaves the facts and the other parts as they were.
    """
    cfg.check()

    def rng(part: str) -> random.Random:
        return random.Random(f"{cfg.seed}:{part}")

    r = rng("structure")
    attributes = r.sample(ATTRIBUTE_WORDS, cfg.attributes)
    seed_attributes = attributes[: cfg.seed_attributes]  # the sample is already in random order
    taken: set[str] = set()
    entities = _names(r, cfg.entities, taken)
    pools = {a: _names(r, cfg.values_per_attribute, taken, syllables=(2,)) for a in attributes}
    facts = {e: {a: r.choice(pools[a]) for a in r.sample(attributes, cfg.attributes_per_entity)} for e in entities}
    held_out = entities[cfg.corpus_entities :]
    world = World(entities, held_out, attributes, seed_attributes, facts)

    seed_set = set(seed_attributes)
    seed_entities = entities[: cfg.seed_entities]
    corpus_entities = entities[: cfg.corpus_entities]

    r = rng("seed")
    seed_facts = [(e, a) for e in seed_entities for a in facts[e] if a in seed_set]
    world.seed_pairs = [{"instruction": _question(r, e, a), "output": _answer(r, e, a, facts)} for e, a in seed_facts]

    r = rng("corpus")
    in_seed = set(seed_facts)
    fact_rows = [
        {"text": _answer(r, e, a, facts), "label": "fact", "entity": e, "attribute": a, "value": facts[e][a]}
        for e in corpus_entities
        for a in facts[e]
        if (e, a) not in in_seed
    ]
    n_noise = round(len(fact_rows) * cfg.noise_fraction / (1 - cfg.noise_fraction))
    # Corpus noise mentions corpus entities only: held-out entities appear in pretraining and nowhere else.
    noise_rows = [
        {"text": _noise(r, corpus_entities, attributes), "label": "noise", "entity": None, "attribute": None, "value": None}
        for _ in range(n_noise)
    ]
    world.corpus = fact_rows + noise_rows
    r.shuffle(world.corpus)

    r = rng("eval")
    world.eval_questions = [
        {"instruction": _question(r, e, a), "answer": ANSWER_FORMS[0].format(a=a, e=e, v=facts[e][a]),
         "entity": e, "attribute": a, "value": facts[e][a]}
        for e in held_out for a in facts[e] if a not in seed_set
    ]  # fmt: skip
    world.backward_eval = [
        {"text": _answer(r, e, a, facts), "entity": e, "attribute": a, "value": facts[e][a]} for e in held_out for a in facts[e]
    ]

    world.rated_pairs = _rated_pairs(rng("rated"), cfg.rated_examples, seed_facts, facts, seed_attributes)
    world.pretrain_texts = _pretrain_texts(rng("pretrain"), cfg, world)
    return world


# --- ground truth ----------------------------------------------------------------------------


def instruction_asks_for(instruction: str, entity: str, attribute: str, value: str | None = None) -> bool:
    """The instruction is a request (a question, or "Tell me ..."), names the entity and the attribute
    word and no other attribute word, and, when the value is given, does not state it: a statement
    about the fact ("The A of E is V.", with any V) is not an instruction that asks for it."""
    text = instruction.strip()
    if not (text.endswith("?") or text.lower().startswith("tell me")):
        return False
    named = set(re.findall(r"[a-z]+", text.lower())) & _ATTRIBUTE_SET
    stated = value is not None and _mentions(text, value)
    return named == {attribute} and _mentions(text, entity) and not stated


def answer_is_correct(answer: str, value: str) -> bool:
    """The answer contains the true value as a word (case-insensitive)."""
    return _mentions(answer, value)


def _mentions(text: str, word: str) -> bool:
    # Whole words only: a name must not count inside a longer name ("Kala" in "Kalami").
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


# --- text generators -------------------------------------------------------------------------


def _names(r: random.Random, n: int, taken: set[str], syllables: tuple[int, ...] = (2, 2, 3)) -> list[str]:
    """n new made-up names, none in `taken` (which they join) nor a word of the world's texts."""
    out: list[str] = []
    while len(out) < n:
        parts = [r.choice(_ONSETS) + r.choice(_VOWELS) for _ in range(r.choice(syllables))]
        name = ("".join(parts) + r.choice(_CODAS)).capitalize()
        if name not in taken and name.lower() not in _RESERVED:
            taken.add(name)
            out.append(name)
    return out


def _question(r: random.Random, e: str, a: str) -> str:
    return r.choice(QUESTION_FORMS).format(a=a, e=e)


def _answer(r: random.Random, e: str, a: str, facts: dict[str, dict[str, str]]) -> str:
    return r.choice(ANSWER_FORMS).format(a=a, e=e, v=facts[e][a])


def _noise(r: random.Random, entities: list[str], attributes: list[str]) -> str:
    """One web text that answers nothing: an ad, navigation, chatter, a post about an entity, or a
    forum question (which echoes a real question without its answer: the most harmful kind)."""
    kind = r.choice(("ad", "navigation", "chatter", "post", "forum"))
    if kind == "forum":
        return _forum_question(r, entities, attributes)
    n, sections = r.randint(2, 60), r.sample(_SECTIONS, 3)
    return r.choice(_NOISE[kind]).format(
        n=n, m=n + r.randint(1, 9), e=r.choice(entities), w=r.choice(_WEEKDAYS), adj=r.choice(_ADJECTIVES),
        user=r.choice(_USERS), p=r.choice(_PRODUCTS), place=r.choice(_PLACES), s=sections,
    )  # fmt: skip


def _forum_question(r: random.Random, entities: list[str], attributes: list[str]) -> str:
    q = _question(r, r.choice(entities), r.choice(attributes))
    return r.choice(_NOISE["forum"]).format(q=q, user=r.choice(_USERS), w=r.choice(_WEEKDAYS))


def rating(fact: bool, asked_for: bool) -> int:
    """The toy world's rating rule, as a human rater would rate a pair: a right answer (a fact text that
    the instruction asks for) 5, an answer about another entity or attribute 2, web noise 1."""
    return 1 if not fact else 5 if asked_for else 2


def _rated_pairs(r: random.Random, n: int, seed_facts: list[tuple[str, str]], facts: dict, seed_attributes: list[str]) -> list[dict]:
    """Pairs rated by `rating`: a right answer, an answer about another entity or attribute, web noise.
    Seed entities and seed attributes only, like the rest of the seed."""
    entities = sorted({e for e, _ in seed_facts})
    rows = []
    for i in range(n):
        e, a = r.choice(seed_facts)
        kind = i % 3
        if kind == 0:
            output, score = _answer(r, e, a, facts), rating(fact=True, asked_for=True)
        elif kind == 1:
            e2, a2 = r.choice([f for f in seed_facts if f != (e, a)])
            output, score = _answer(r, e2, a2, facts), rating(fact=True, asked_for=False)
        else:
            output, score = _noise(r, entities, seed_attributes), rating(fact=False, asked_for=False)
        rows.append({"instruction": _question(r, e, a), "output": output, "score": score})
    return rows


RATED_PAGE = "<instruction>\n{instruction}\n</instruction>\n\n<answer>\n{output}\n</answer>\n\nScore: {score}"


def rated_pages(world: World, n: int, seed: int) -> list[str]:
    """n pages of graded answers over the world's facts, in the rubric's own tags (the web's graded
    answers, for a base that has never seen a rating), rated by `rating`: a question with its right
    answer, with the answer about another entity's same attribute or the entity's other attribute, with
    web noise. Every entity, held-out ones too: this is pretraining text, like the profile pages. Used by
    bench/toy/rubric_curator.py --rated-pages; not part of the default world."""
    r = random.Random(f"{seed}:rated_pages")
    facts = world.facts
    by_attribute: dict[str, list[str]] = {}
    for e, attrs in facts.items():
        for a in attrs:
            by_attribute.setdefault(a, []).append(e)
    pages = []
    for i in range(n):
        e = r.choice(world.entities)
        a = r.choice(sorted(facts[e]))
        kind = i % 4
        if kind == 0:
            output, score = _answer(r, e, a, facts), rating(fact=True, asked_for=True)
        elif kind == 1:  # the hard case: the right attribute, another entity's value
            others = [x for x in by_attribute[a] if x != e] or [x for x in world.entities if x != e]
            e2 = r.choice(others)
            output, score = _answer(r, e2, a if a in facts[e2] else r.choice(sorted(facts[e2])), facts), rating(True, False)
        elif kind == 2:
            a2 = r.choice([x for x in facts[e] if x != a])
            output, score = _answer(r, e, a2, facts), rating(fact=True, asked_for=False)
        else:
            output, score = _noise(r, world.entities, world.attributes), rating(fact=False, asked_for=False)
        pages.append(RATED_PAGE.format(instruction=_question(r, e, a), output=output, score=score))
    return pages


def _pretrain_texts(r: random.Random, cfg: WorldConfig, world: World) -> list[str]:
    """The base model's pretraining text: every entity's facts, never the seed pairs themselves.

    Profile pages state one fact per sentence with the entity named in each (whole-entity pages
    that named it once taught fine-tuned models to copy names); list pages repeat one attribute
    word across entities, which is what lets the backward model write unseen attribute words.
    """
    facts = world.facts
    texts = []
    for e in world.entities:
        for _ in range(cfg.profile_pages):
            attrs = list(facts[e])
            r.shuffle(attrs)
            texts.append(e + "\n" + " ".join(_answer(r, e, a, facts) for a in attrs))
    if cfg.list_pages:
        for a in world.attributes:
            having = [e for e in world.entities if a in facts[e]]
            for _ in range(LIST_PAGES_PER_ATTRIBUTE):
                sample = r.sample(having, min(ENTITIES_PER_LIST_PAGE, len(having)))
                texts.append(f"List of {a} by entity\n" + "\n".join(_answer(r, e, a, facts) for e in sample))
    texts += [_noise(r, world.entities, world.attributes) for _ in range(cfg.web_pages)]
    texts += [_forum_question(r, world.entities, world.attributes) for _ in range(cfg.forum_posts)]
    r.shuffle(texts)
    return texts

